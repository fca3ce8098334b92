/**
 * format.js — pure helpers that turn server data into words: local times, day
 * separators, why a socket closed, what an API refusal means to a person, and the
 * random client_id a message is sent with. No DOM, no state.
 */

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const dayFmt = new Intl.DateTimeFormat(undefined, { weekday: 'long', day: 'numeric', month: 'long', year: 'numeric' });
const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });

/** "14:03" in the viewer's time zone. */
export function localTime(ts) {
  return timeFmt.format(new Date(ts));
}

/** "3 Jan 2025, 14:03:12", for tooltips and the audit table. */
export function fullTime(ts) {
  return fullFmt.format(new Date(ts));
}

/** A key that is equal for two timestamps on the same local day. */
export function dayKey(ts) {
  const d = new Date(ts);
  return `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}`;
}

/** "Today", "Yesterday" or "Monday, 3 January 2025". */
export function dayLabel(ts, now = new Date()) {
  const key = dayKey(ts);
  if (key === dayKey(now)) return 'Today';
  const y = new Date(now);
  y.setDate(y.getDate() - 1);
  if (key === dayKey(y)) return 'Yesterday';
  return dayFmt.format(new Date(ts));
}

/**
 * Why a socket closed, in words, from its close code and the server's reason text
 * (docs/socket.md: 4001 expired; 4003 kicked, banned or revoked; 1001 going away; 1008
 * too slow).
 */
export function closeReason(code, reason) {
  switch (code) {
    case 4001: return 'your session expired';
    case 4003:
      if (reason === 'kicked') return 'you were kicked by a moderator';
      if (reason === 'banned') return 'your account has been banned';
      return 'your login was revoked';
    case 1000: return 'the connection was closed';
    case 1001: return reason === 'no answer to ping'
      ? 'the server heard nothing from this page for too long'
      : 'the server is restarting or going away';
    case 1008: return 'the connection was too slow to keep up';
    case 1009: return 'a message was too big';
    case 1011: return 'the server hit an error';
    case 4000: return 'the server stopped answering';
    default: return 'the connection was lost';
  }
}

/** A person-readable sentence for a refused login or registration. */
export function authError(err, registering) {
  switch (err.code) {
    case 'network': return 'Cannot reach the server. Check your connection and try again.';
    case 'unauthorized': return 'Wrong username or password.';
    case 'conflict': return 'That username is taken. Choose another one.';
    case 'forbidden':
      return registering
        ? 'Registration is closed on this server. Ask an admin for an account.'
        : 'This account is banned.';
    case 'rate_limited': return `Too many attempts. Try again in ${waitWords(err.retryAfter)}.`;
    case 'too_large': return 'That is too long.';
    case 'bad_request': return capitalise(err.message) || 'Invalid username or password.';
    default: return `The server could not do that (${err.message || err.code}).`;
  }
}

/** A short sentence for any other refused request or socket error. */
export function actionError(err) {
  switch (err.code) {
    case 'network': return 'Cannot reach the server.';
    case 'forbidden': return 'You are not allowed to do that.';
    case 'not_found': return capitalise(err.message) || 'Not found.';
    case 'conflict': return capitalise(err.message) || 'That already exists.';
    case 'rate_limited': return `Slow down: try again in ${waitWords(err.retryAfter)}.`;
    case 'too_large': return 'Too long: a message holds at most 4000 characters.';
    default: return capitalise(err.message) || 'Something went wrong.';
  }
}

function waitWords(secs) {
  const s = Number(secs);
  if (!Number.isFinite(s) || s <= 0) return 'a moment';
  if (s < 90) return `${Math.ceil(s)} s`;
  return `${Math.ceil(s / 60)} min`;
}

function capitalise(s) {
  return s ? s[0].toUpperCase() + s.slice(1) : '';
}

/** Length in Unicode characters (what the server's 4000 limit counts). */
export function charCount(s) {
  let n = 0;
  for (const _ of s) n++;
  return n;
}

/**
 * A random client_id ([A-Za-z0-9_-], 1–64 chars). crypto.randomUUID exists only in
 * secure contexts (https or localhost), so a page served over plain http on a LAN
 * falls back to getRandomValues, which exists everywhere.
 */
export function newClientId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}
