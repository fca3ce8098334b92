/**
 * ui/messages.js — the message pane of the open conversation: day separators, local
 * times, consecutive messages from one person grouped, delete buttons for moderators,
 * pending (unacked) messages below the stored ones, and the scroll rules: stay at the
 * newest message unless the person scrolled up (then a "New messages" button), keep
 * the view still when older history is put on top, and ask for more history near the
 * top.
 */
import { h, $ } from './dom.js';
import { localTime, fullTime, dayKey, dayLabel } from '../format.js';

const NEAR_TOP = 120;
const AT_BOTTOM = 48;
const GROUP_MS = 5 * 60 * 1000;

let hooks = { onDelete() {}, onNearTop() {}, onRetry() {}, onDiscard() {} };
let shown = { key: null, last: null };

/** @param {{onDelete(m), onNearTop(), onRetry(clientId), onDiscard(clientId)}} h */
export function initMessages(handlers) {
  hooks = handlers;
  const pane = $('messages');
  pane.addEventListener('scroll', () => {
    if (pane.scrollTop < NEAR_TOP) hooks.onNearTop();
    if (atBottom()) $('jump-btn').hidden = true;
  }, { passive: true });
  $('jump-btn').addEventListener('click', () => { toBottom(); pane.focus(); });
}

export function atBottom() {
  const el = $('messages');
  return el.scrollHeight - el.scrollTop - el.clientHeight < AT_BOTTOM;
}

export function toBottom() {
  const el = $('messages');
  el.scrollTop = el.scrollHeight;
  $('jump-btn').hidden = true;
}

/** Does the pane have room for more (so scrolling cannot trigger a history load)? */
export function notFilled() {
  const el = $('messages');
  return el.scrollHeight <= el.clientHeight + NEAR_TOP;
}

function messageNodes(m, prev, opts) {
  const out = [];
  const sameDay = prev && dayKey(prev.ts) === dayKey(m.ts);
  if (!sameDay) {
    out.push(h('li', { class: 'day', role: 'separator' }, h('span', { text: dayLabel(m.ts) })));
  }
  const grouped = sameDay && prev.from === m.from && new Date(m.ts) - new Date(prev.ts) < GROUP_MS;
  const cls = ['msg'];
  if (m.from === opts.me) cls.push('mine');
  if (grouped) cls.push('cont');
  const del = opts.canDelete
    ? h('button', {
      class: 'del small', text: 'Delete', 'aria-label': `Delete message from ${m.from}`,
      onclick: () => hooks.onDelete(m),
    })
    : null;
  out.push(h('li', { class: cls.join(' '), dataset: { id: m.id } },
    h('div', { class: 'meta' },
      h('span', { class: 'from', text: m.from }),
      h('time', { datetime: m.ts, title: fullTime(m.ts), text: localTime(m.ts) }),
      del),
    h('div', { class: 'body', text: m.body })));
  return out;
}

function historyLine(conv) {
  const el = $('history-status');
  if (conv.loadingOlder || !conv.loaded) el.textContent = 'Loading messages…';
  else if (!conv.hasOlder) {
    el.textContent = conv.messages.length
      ? (conv.kind === 'room' ? `The beginning of #${conv.id}.` : `The beginning of your conversation with ${conv.id}.`)
      : 'No messages yet. Say hello!';
  } else el.textContent = '';
}

/**
 * Rebuilds the whole list. `keep`: 'bottom' (a newly opened conversation), 'anchor'
 * (older messages went on top: the same messages stay in view) or 'auto' (stay at the
 * bottom if there, else keep the scroll position).
 */
export function renderAll(conv, opts, keep = 'auto') {
  const pane = $('messages');
  const wasBottom = atBottom();
  const fromBottom = pane.scrollHeight - pane.scrollTop;
  const list = $('message-list');
  const nodes = [];
  let prev = null;
  for (const m of conv.messages) {
    nodes.push(...messageNodes(m, prev, opts));
    prev = m;
  }
  list.replaceChildren(...nodes);
  shown = { key: conv.key, last: prev };
  historyLine(conv);
  if (keep === 'bottom' || (keep === 'auto' && wasBottom)) toBottom();
  else if (keep === 'anchor') pane.scrollTop = pane.scrollHeight - fromBottom;
}

/** Adds messages newer than any shown; falls back to a full render otherwise. */
export function appendNew(conv, msgs, opts) {
  if (shown.key !== conv.key) return renderAll(conv, opts, 'bottom');
  const wasBottom = atBottom();
  const list = $('message-list');
  for (const m of msgs) {
    if (shown.last && m.id <= shown.last.id) return renderAll(conv, opts);
    list.append(...messageNodes(m, shown.last, opts));
    shown.last = m;
  }
  historyLine(conv);
  if (wasBottom || msgs.some((m) => m.from === opts.me)) toBottom();
  else $('jump-btn').hidden = false;
}

/** The outbox entries of this conversation, under the stored messages. */
export function renderPending(pending, me, connected) {
  const wasBottom = atBottom();
  $('pending-list').replaceChildren(...pending.map((p) => h('li', {
    class: `msg mine pending${p.failed ? ' failed' : ''}`, dataset: { clientId: p.clientId },
  },
  h('div', { class: 'meta' },
    h('span', { class: 'from', text: me }),
    h('span', { class: 'state', text: p.failed ? `Not sent: ${p.failed}` : (connected ? 'Sending…' : 'Waiting for the connection…') }),
    p.failed ? h('button', { class: 'small', text: 'Retry', onclick: () => hooks.onRetry(p.clientId) }) : null,
    p.failed ? h('button', { class: 'small', text: 'Discard', onclick: () => hooks.onDiscard(p.clientId) }) : null),
  h('div', { class: 'body', text: p.body }))));
  if (wasBottom) toBottom();
}

export function clearMessages() {
  $('message-list').replaceChildren();
  $('pending-list').replaceChildren();
  $('history-status').textContent = '';
  shown = { key: null, last: null };
}
