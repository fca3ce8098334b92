/**
 * api.js — the REST client and the access token's life.
 *
 * - The access token lives in this module's memory only; never in storage.
 * - Login asks for the refresh token as the HttpOnly cookie `parley_refresh`
 *   (`"cookie": true`), so a reload resumes with `POST /api/refresh` and no body token.
 * - Every use of the cookie (resume, refresh, login, logout) runs under the Web Lock
 *   "parley-refresh": tabs share the cookie, and two refreshes with the same refresh
 *   token at once would otherwise lean on the server's --refresh-grace. (Web Locks exist
 *   only in secure contexts — https or localhost; elsewhere the grace covers it.)
 * - The token is renewed at 70 % of its lifetime; `onToken` listeners (the socket)
 *   hear each new one. A refusal of the refresh itself (401 revoked/expired, 403
 *   banned) ends the session and `onLost` listeners hear why.
 * - Tabs tell each other about logins and logouts over a BroadcastChannel.
 */

/** A refused or failed request: HTTP status (0 = no answer), code, message, Retry-After. */
export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

const LOCK = 'parley-refresh';
const RENEW_AT = 0.7;

let access = null; // { token, expiresAt (ms), user }
let renewTimer = null;
let inflight = null;
const tokenListeners = new Set();
const lostListeners = new Set();
const channel = 'BroadcastChannel' in self ? new BroadcastChannel('parley') : null;

/** `fn(token, user)` after every new access token. */
export function onToken(fn) { tokenListeners.add(fn); }
/** `fn(reason)` when the session ends: 'logout', 'elsewhere', 'revoked', 'banned'. */
export function onLost(fn) { lostListeners.add(fn); }
/** `fn()` when another tab logged in. */
export function onLoginElsewhere(fn) {
  channel?.addEventListener('message', (e) => { if (e.data === 'login') fn(); });
}

export function user() { return access?.user ?? null; }
export function token() { return access?.token ?? null; }
/** Milliseconds the current access token has left (0 without one). */
export function tokenLeft() { return access ? access.expiresAt - Date.now() : 0; }

function withLock(fn) {
  if (navigator.locks?.request) return navigator.locks.request(LOCK, fn);
  return fn();
}

/** One HTTP call; JSON in and out; throws ApiError. */
async function call(method, path, { body, bearer } = {}) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  let res;
  try {
    res = await fetch(path, {
      method, headers, cache: 'no-store', credentials: 'same-origin',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, 'network', 'cannot reach the server');
  }
  if (res.status === 204) return null;
  let data = null;
  try { data = await res.json(); } catch { /* not JSON */ }
  if (!res.ok) {
    const e = data?.error ?? {};
    const ra = res.headers.get('Retry-After');
    throw new ApiError(res.status, e.code ?? 'internal', e.message ?? res.statusText, ra ? Number(ra) : null);
  }
  return data;
}

function adopt(pair) {
  if (access && pair.user.id !== access.user.id) {
    // Another tab logged in as someone else and the cookie is now theirs.
    location.reload();
    return;
  }
  access = { token: pair.access_token, expiresAt: Date.now() + pair.expires_in * 1000, user: pair.user };
  clearTimeout(renewTimer);
  renewTimer = setTimeout(renew, Math.max(1000, pair.expires_in * 1000 * RENEW_AT));
  for (const fn of tokenListeners) fn(access.token, access.user);
}

function lose(reason) {
  clearTimeout(renewTimer);
  if (!access) return;
  access = null;
  for (const fn of lostListeners) fn(reason);
}

async function renew() {
  try {
    await refresh();
  } catch (e) {
    // No answer or a busy server: try again while the token may still be good.
    if (access && !(e.status === 401 || e.status === 403)) {
      renewTimer = setTimeout(renew, Math.min(5000, Math.max(1000, (e.retryAfter ?? 2) * 1000)));
    }
  }
}

/**
 * Rotates the cookie for a new access token. Concurrent callers in this tab share one
 * request; other tabs wait on the lock. 401 and 403 end the session.
 */
export function refresh() {
  inflight ??= withLock(() => call('POST', '/api/refresh', { body: {} }))
    .then((pair) => { adopt(pair); return pair.user; })
    .catch((e) => {
      if (e.status === 403) lose('banned');
      else if (e.status === 401) lose('revoked');
      throw e;
    })
    .finally(() => { inflight = null; });
  return inflight;
}

/** On page load: the user of the cookie's login, or null when there is none. */
export async function resume() {
  try {
    const pair = await withLock(() => call('POST', '/api/refresh', { body: {} }));
    adopt(pair);
    return pair.user;
  } catch (e) {
    if (e.status === 401) return null;
    throw e;
  }
}

export async function login(username, password) {
  const pair = await withLock(() => call('POST', '/api/login', { body: { username, password, cookie: true } }));
  access = null; // a fresh login may be another user
  adopt(pair);
  channel?.postMessage('login');
  return pair.user;
}

export async function register(username, password) {
  return (await call('POST', '/api/register', { body: { username, password } })).user;
}

/** Revokes this login (and its cookie) on the server, then ends the session everywhere. */
export async function logout() {
  try {
    if (tokenLeft() < 5000) await refresh();
    const bearer = token();
    await withLock(() => call('POST', '/api/logout', { body: {}, bearer }));
  } catch { /* the session ends here either way */ }
  channel?.postMessage('logout');
  lose('logout');
}

channel?.addEventListener('message', (e) => { if (e.data === 'logout') lose('elsewhere'); });

/** An authenticated call; a 401 gets one refresh and one retry. */
export async function request(method, path, body) {
  if (!access) throw new ApiError(401, 'unauthorized', 'not logged in');
  if (tokenLeft() < 2000) await refresh();
  try {
    return await call(method, path, { body, bearer: access.token });
  } catch (e) {
    if (e.status !== 401) throw e;
    await refresh();
    return call(method, path, { body, bearer: access.token });
  }
}

/** `path` with the query parameters that are not null. */
export function withQuery(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v != null && v !== '') q.set(k, String(v));
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

/** Segments of a path, escaped. */
export const seg = encodeURIComponent;
