/**
 * ui/online.js — who is online in the open room, with a Kick button for those who may
 * kick (moderators and admins; the server checks again).
 */
import { h, $ } from './dom.js';

let hooks = { onKick() {} };

/** @param {{onKick(username)}} handlers */
export function initOnline(handlers) {
  hooks = handlers;
  const toggle = $('online-toggle');
  toggle.addEventListener('click', () => {
    const open = $('online-pane').classList.toggle('open');
    toggle.setAttribute('aria-expanded', String(open));
  });
}

/** `conv` null hides the pane (DMs, admin). */
export function renderOnline(conv, { me, canKick }) {
  const pane = $('online-pane');
  pane.hidden = !conv;
  $('app-view').classList.toggle('no-online', !conv);
  $('online-toggle').hidden = !conv;
  if (!conv) return;
  const names = [...conv.online].sort((a, b) => a.localeCompare(b));
  $('online-count').textContent = `(${names.length})`;
  $('online-toggle').textContent = `Online (${names.length})`;
  $('online-list').replaceChildren(...names.map((u) => h('li', { dataset: { user: u } },
    h('span', { class: 'dot', 'aria-hidden': 'true' }),
    h('span', { class: 'who', text: u === me ? `${u} (you)` : u }),
    canKick && u !== me
      ? h('button', { class: 'kick small', text: 'Kick', 'aria-label': `Kick ${u}`, onclick: () => hooks.onKick(u) })
      : null)));
}
