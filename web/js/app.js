/**
 * app.js — the entry point and controller: boots the session (a reload resumes from
 * the refresh cookie), wires the socket's frames into state.js and the ui/ modules,
 * and carries out what the person does (open, join, leave, send, delete, kick).
 *
 * Modules: api.js (REST and tokens), socket.js (WebSocket, reconnect, outbox),
 * state.js (what the page knows), format.js (words and times), ui/*.js (rendering).
 */
import * as api from './api.js';
import { ChatSocket } from './socket.js';
import { Conv, state, can, currentConv, totalUnread, savedRooms, saveRooms } from './state.js';
import { actionError, charCount } from './format.js';
import { $, h, announce, notice, confirmAction } from './ui/dom.js';
import { initAuth, showAuth } from './ui/auth.js';
import { initSidebar, renderSidebar } from './ui/sidebar.js';
import { initMessages, renderAll, appendNew, renderPending, clearMessages, toBottom, notFilled } from './ui/messages.js';
import { initOnline, renderOnline } from './ui/online.js';
import { initStatus, renderStatus } from './ui/status.js';
import { initDialogs, openRooms, openDirectory } from './ui/dialogs.js';
import { initAdmin, showAdmin } from './ui/admin.js';

const PAGE = 50;
const MAX_CHARS = 4000;

const socket = new ChatSocket({
  rooms: () => [...state.rooms.values()].map((c) => ({ room: c.id, since: c.lastId })),
  onFrame,
  onState(s) {
    renderStatus(s);
    if (s.status === 'connected') catchUpDms();
    showPending();
  },
  onOutbox: showPending,
  onAck(p, id) {
    // A repeat is acked without a new broadcast: make sure the message is shown.
    const conv = p.kind === 'room' ? state.rooms.get(p.target) : state.dms.get(p.target);
    if (!conv || conv.byId.has(id)) return;
    const me = state.me.username;
    const m = p.kind === 'room'
      ? { id, room: p.target, from: me, body: p.body, ts: p.ts, local: true }
      : { id, from: me, to: p.target, body: p.body, ts: p.ts, local: true };
    receive(conv, [m]);
  },
});

// ---- rendering helpers -------------------------------------------------------------

function opts() {
  const conv = currentConv();
  return { me: state.me.username, canDelete: conv?.kind === 'room' && can('moderate') };
}

function updateTitle() {
  const n = totalUnread();
  const c = state.current;
  const where = !c ? '' : c.kind === 'room' ? `#${c.id} · ` : c.kind === 'dm' ? `${c.id} · ` : 'Admin · ';
  document.title = `${n ? `(${n}) ` : ''}${where}parley`;
}

function showPending() {
  const conv = currentConv();
  if (!conv || !state.me) return;
  renderPending(socket.pendingFor(conv.kind, conv.id), state.me.username, socket.isOpen());
}

function showOnline() {
  const conv = currentConv();
  renderOnline(conv?.kind === 'room' ? conv : null, { me: state.me.username, canKick: can('moderate') });
}

function renderAnnouncements() {
  $('announcements').replaceChildren(...state.announcements.slice(-3).map((a) => h('div', { class: 'announcement', role: 'note' },
    h('strong', { text: `Announcement from ${a.from}` }),
    h('time', { datetime: a.ts, text: ` · ${new Date(a.ts).toLocaleString()}` }),
    h('button', {
      class: 'small', text: 'Dismiss', 'aria-label': `Dismiss announcement from ${a.from}`,
      onclick: () => {
        state.announcements.splice(state.announcements.indexOf(a), 1);
        renderAnnouncements();
      },
    }),
    h('p', { text: a.body }))));
}

// ---- incoming ----------------------------------------------------------------------

/** New messages for `conv`: store, count unread, render, tell screen readers. */
function receive(conv, msgs) {
  const { added, mode } = conv.add(msgs);
  if (!added.length) return;
  const me = state.me.username;
  const showing = currentConv() === conv;
  const fresh = added.filter((m) => m.from !== me && !m.local);
  if ((!showing || document.hidden) && fresh.length) conv.markUnread(fresh.length, fresh[0].id);
  if (showing) {
    if (mode === 'append') appendNew(conv, added, opts());
    else renderAll(conv, opts());
    for (const m of fresh.slice(-3)) announce(`${m.from}: ${m.body}`);
  }
  renderSidebar();
  updateTitle();
}

function dmConv(user) {
  let conv = state.dms.get(user);
  if (!conv) {
    conv = new Conv('dm', user);
    state.dms.set(user, conv);
  }
  return conv;
}

function onFrame(f) {
  const me = state.me?.username;
  if (!me) return;
  switch (f.type) {
    case 'joined': {
      const conv = state.rooms.get(f.room);
      if (!conv) return;
      conv.online = new Set(f.online);
      if (!conv.loaded) loadLatest(conv);
      renderSidebar();
      if (currentConv() === conv) showOnline();
      return;
    }
    case 'message': {
      const conv = state.rooms.get(f.room);
      if (f.from === me) socket.settle(f.client_id);
      if (conv) receive(conv, [f]);
      return;
    }
    case 'dm': {
      if (f.from === me) socket.settle(f.client_id);
      receive(dmConv(f.from === me ? f.to : f.from), [f]);
      return;
    }
    case 'presence':
      return presence(f.room, f.status === 'online' ? [f.user] : [], f.status === 'online' ? [] : [f.user]);
    case 'presence_batch':
      return presence(f.room, f.online ?? [], f.offline ?? []);
    case 'deleted': {
      const conv = state.rooms.get(f.room);
      if (!conv?.remove(f.id, me)) return;
      if (currentConv() === conv) renderAll(conv, opts());
      renderSidebar();
      updateTitle();
      return;
    }
    case 'announcement':
      state.announcements.push(f);
      renderAnnouncements();
      announce(`Announcement from ${f.from}: ${f.body}`);
      return;
    case 'error':
      if (typeof f.ref === 'string' && f.ref.startsWith('join:')) {
        const room = f.ref.slice(5);
        notice(`Could not join #${room}: ${actionError(f)}`);
        if (f.code === 'not_found') dropRoom(room);
        return;
      }
      notice(actionError(f));
      return;
    default:
  }
}

/** presence_batch lists are set updates to the list from `joined`. */
function presence(room, online, offline) {
  const conv = state.rooms.get(room);
  if (!conv) return;
  for (const u of offline) conv.online.delete(u);
  for (const u of online) conv.online.add(u);
  renderSidebar();
  if (currentConv() === conv) showOnline();
}

// ---- history -----------------------------------------------------------------------

function historyPath(conv, params) {
  const base = conv.kind === 'room' ? `/api/rooms/${api.seg(conv.id)}/messages` : `/api/dms/${api.seg(conv.id)}`;
  return api.withQuery(base, { limit: PAGE, ...params });
}

async function loadLatest(conv) {
  try {
    const { messages } = await api.request('GET', historyPath(conv, {}));
    conv.loaded = true;
    conv.hasOlder = messages.length >= PAGE;
    conv.add(messages);
    if (currentConv() === conv) {
      renderAll(conv, opts(), 'bottom');
      if (notFilled()) loadOlder(conv);
    }
    renderSidebar();
  } catch (e) {
    if (currentConv() === conv) notice(`Could not load messages: ${actionError(e)}`);
  }
}

async function loadOlder(conv) {
  if (!conv.loaded || conv.loadingOlder || !conv.hasOlder || conv.oldestId == null) return;
  conv.loadingOlder = true;
  if (currentConv() === conv) renderAll(conv, opts(), 'anchor');
  try {
    const { messages } = await api.request('GET', historyPath(conv, { before: conv.oldestId }));
    conv.hasOlder = messages.length >= PAGE;
    conv.add(messages);
  } catch (e) {
    notice(`Could not load older messages: ${actionError(e)}`);
  } finally {
    conv.loadingOlder = false;
  }
  if (currentConv() === conv) {
    renderAll(conv, opts(), 'anchor');
    if (notFilled()) loadOlder(conv);
  }
}

/** After a (re)connect: DMs have no `since`, so fetch what came while away. */
async function catchUpDms() {
  try {
    const { conversations } = await api.request('GET', '/api/dms');
    for (const { user, last } of conversations) {
      const conv = dmConv(user);
      if (!conv.last || last.id > conv.last.id) conv.last = last;
    }
  } catch { /* the list is a convenience */ }
  for (const conv of state.dms.values()) {
    if (!conv.loaded) continue;
    try {
      for (;;) {
        const { messages } = await api.request('GET', historyPath(conv, { after: conv.lastId }));
        receive(conv, messages);
        if (messages.length < PAGE) break;
      }
    } catch { break; }
  }
  renderSidebar();
}

// ---- actions -----------------------------------------------------------------------

function openConv(kind, id) {
  const conv = kind === 'room' ? state.rooms.get(id) : dmConv(id);
  if (!conv) return;
  state.current = { kind, id };
  conv.markRead();
  $('admin-view').hidden = true;
  $('chat').hidden = false;
  $('conv-title').textContent = kind === 'room' ? `#${id}` : id;
  $('conv-sub').textContent = kind === 'room' ? '' : 'Direct messages';
  $('leave-btn').hidden = kind !== 'room';
  $('composer-input').placeholder = kind === 'room' ? `Message #${id}` : `Message ${id}`;
  $('composer-input').disabled = false;
  $('composer-error').textContent = '';
  history.replaceState(null, '', `#${kind}/${encodeURIComponent(id)}`);
  clearMessages();
  renderAll(conv, opts(), 'bottom');
  showPending();
  showOnline();
  renderSidebar();
  updateTitle();
  if (!conv.loaded && kind === 'dm') loadLatest(conv);
  else if (conv.loaded && notFilled()) loadOlder(conv);
}

function openNothing() {
  state.current = null;
  $('admin-view').hidden = true;
  $('chat').hidden = false;
  $('conv-title').textContent = 'No room open';
  $('conv-sub').textContent = 'Join a room or start a direct message.';
  $('leave-btn').hidden = true;
  $('composer-input').disabled = true;
  clearMessages();
  renderOnline(null, { me: state.me.username, canKick: false });
  renderSidebar();
  updateTitle();
}

function joinRoom(name) {
  if (!state.rooms.has(name)) {
    state.rooms.set(name, new Conv('room', name));
    saveRooms();
    socket.join(name, null);
  }
  openConv('room', name);
}

function dropRoom(name) {
  state.rooms.delete(name);
  saveRooms();
  if (state.current?.kind === 'room' && state.current.id === name) {
    const next = state.rooms.keys().next();
    if (next.done) openNothing();
    else openConv('room', next.value);
  }
  renderSidebar();
  updateTitle();
}

function leaveRoom() {
  const c = state.current;
  if (c?.kind !== 'room') return;
  socket.send({ type: 'leave', room: c.id });
  for (const p of socket.pendingFor('room', c.id)) socket.discard(p.clientId);
  dropRoom(c.id);
}

function openAdmin() {
  state.current = { kind: 'admin', id: '' };
  $('chat').hidden = true;
  renderOnline(null, { me: state.me.username, canKick: false });
  $('admin-view').hidden = false;
  history.replaceState(null, '', '#admin');
  renderSidebar();
  updateTitle();
  showAdmin();
}

function sendComposer() {
  const conv = currentConv();
  const input = $('composer-input');
  const body = input.value;
  if (!conv || !body.trim()) return;
  const n = charCount(body);
  if (n > MAX_CHARS) {
    $('composer-error').textContent = `Too long: ${n} characters, at most ${MAX_CHARS}.`;
    return;
  }
  $('composer-error').textContent = '';
  socket.post(conv.kind, conv.id, body);
  input.value = '';
  input.rows = 1;
  toBottom();
}

async function deleteMessage(m) {
  if (!(await confirmAction(`Delete this message from ${m.from}? Everyone stops seeing it.`, 'Delete'))) return;
  try {
    await api.request('DELETE', `/api/messages/${m.id}`);
  } catch (e) {
    notice(`Could not delete: ${actionError(e)}`);
  }
}

async function kick(user) {
  if (!(await confirmAction(`Kick ${user}? Their connections close now; they can come back.`, 'Kick'))) return;
  if (socket.send({ type: 'kick', user, ref: `kick:${user}` })) notice(`Kicked ${user}.`);
  else notice('Not connected: try again once the connection is back.');
}

// ---- session -----------------------------------------------------------------------

const LOST = {
  banned: 'You were disconnected: this account has been banned.',
  revoked: 'Your login has ended (it expired, was revoked, or the password changed). Please log in again.',
  elsewhere: 'You logged out in another tab.',
  logout: '',
};

function applyRoles() {
  $('admin-btn').hidden = !can('admin');
  $('me').textContent = state.me.username;
  $('me').title = `roles: ${state.me.roles.join(', ')}`;
}

function startSession(user) {
  state.reset();
  state.me = user;
  $('boot').hidden = true;
  $('auth-view').hidden = true;
  $('app-view').hidden = false;
  applyRoles();
  for (const name of savedRooms(user.username)) state.rooms.set(name, new Conv('room', name));
  const [kind, rawId] = location.hash.slice(1).split('/');
  const id = rawId ? decodeURIComponent(rawId) : '';
  socket.start(user.username);
  if (kind === 'admin' && can('admin')) openAdmin();
  else if (kind === 'dm' && id && id !== user.username) openConv('dm', id);
  else if (kind === 'room' && /^[a-z0-9_-]{1,64}$/.test(id)) joinRoom(id);
  else if (state.rooms.size) openConv('room', state.rooms.keys().next().value);
  else openNothing();
  renderAnnouncements();
  $('composer-input').focus();
}

function endSession(reason) {
  socket.stop();
  state.reset();
  clearMessages();
  document.title = 'parley';
  showAuth(LOST[reason] ?? '');
}

api.onLost(endSession);
api.onToken((token, user) => {
  if (!state.me || user.roles.join() === state.me.roles.join()) return;
  state.me = user;
  applyRoles();
  const conv = currentConv();
  if (conv) renderAll(conv, opts());
  showOnline();
  if (state.current?.kind === 'admin' && !can('admin')) openNothing();
});
api.onLoginElsewhere(async () => {
  if (state.me) return;
  const user = await api.resume().catch(() => null);
  if (user) startSession(user);
});

// ---- wiring ------------------------------------------------------------------------

initAuth(startSession);
initSidebar({ onOpen: openConv });
initMessages({
  onDelete: deleteMessage,
  onNearTop: () => { const c = currentConv(); if (c) loadOlder(c); },
  onRetry: (id) => socket.retry(id),
  onDiscard: (id) => socket.discard(id),
});
initOnline({ onKick: kick });
initStatus({ onRetry: () => socket.reconnectNow() });
initDialogs({ onJoin: joinRoom, onDm: (u) => openConv('dm', u) });
initAdmin();

$('composer').addEventListener('submit', (e) => { e.preventDefault(); sendComposer(); });
$('composer-input').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    sendComposer();
  }
});
$('composer-input').addEventListener('input', (e) => {
  const lines = e.target.value.split('\n').length;
  e.target.rows = Math.min(6, Math.max(1, lines));
});
$('rooms-btn').addEventListener('click', openRooms);
$('dm-btn').addEventListener('click', openDirectory);
$('leave-btn').addEventListener('click', leaveRoom);
$('admin-btn').addEventListener('click', openAdmin);
$('logout-btn').addEventListener('click', () => api.logout());
document.addEventListener('visibilitychange', () => {
  if (document.hidden) return;
  const conv = currentConv();
  if (conv?.unread) {
    conv.markRead();
    renderSidebar();
    updateTitle();
  }
});

document.documentElement.dataset.started = 'yes';
(async function boot() {
  try {
    const user = await api.resume();
    if (user) startSession(user);
    else showAuth();
  } catch (e) {
    showAuth(actionError(e));
  }
}());
