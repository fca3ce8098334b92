/**
 * ui/sidebar.js — the list of joined rooms (online and unread counts) and of DM
 * conversations (last message, unread count), with the open one marked.
 */
import { h, $ } from './dom.js';
import { state } from '../state.js';

let hooks = { onOpen() {} };

/** @param {{onOpen(kind, id)}} handlers */
export function initSidebar(handlers) {
  hooks = handlers;
}

function badge(n) {
  return n > 0 ? h('span', { class: 'badge', text: n > 99 ? '99+' : String(n), 'aria-label': `${n} unread` }) : null;
}

function item(kind, id, label, sub, unread) {
  const cur = state.current?.kind === kind && state.current.id === id;
  return h('li', {},
    h('button', {
      class: `conv${unread ? ' has-unread' : ''}`, 'aria-current': cur ? 'true' : null,
      dataset: { kind, id }, onclick: () => hooks.onOpen(kind, id),
    },
    h('span', { class: 'conv-name', text: label }),
    sub ? h('span', { class: 'conv-sub', text: sub }) : null,
    badge(unread)));
}

export function renderSidebar() {
  const rooms = [...state.rooms.values()].map((c) => {
    const online = c.online.size || state.roomOnline.get(c.id) || 0;
    return item('room', c.id, `#${c.id}`, `${online} online`, c.unread);
  });
  $('room-list').replaceChildren(...rooms);
  const dms = [...state.dms.values()]
    .sort((a, b) => (b.last?.id ?? 0) - (a.last?.id ?? 0))
    .map((c) => item('dm', c.id, c.id, c.last ? `${c.last.from === state.me.username ? 'You: ' : ''}${c.last.body}` : '', c.unread));
  $('dm-list').replaceChildren(...(dms.length ? dms : [h('li', { class: 'muted empty', text: 'No conversations yet' })]));
}
