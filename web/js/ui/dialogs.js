/**
 * ui/dialogs.js — the two pickers: every room on the server (join one, or create a
 * new one) and the user directory (start a DM). Both are modal <dialog>s, so focus
 * stays inside and Escape closes them.
 */
import { h, $, openDialog } from './dom.js';
import * as api from '../api.js';
import { actionError } from '../format.js';
import { state } from '../state.js';

const ROOM = /^[a-z0-9_-]{1,64}$/;
const ROOM_PAGE = 200;

let hooks = { onJoin() {}, onDm() {} };
let roomsAfter = null;
let searchTimer = null;

function roomItem(r) {
  const joined = state.rooms.has(r.name);
  return h('li', {},
    h('span', { class: 'pick-name', text: `#${r.name}` }),
    h('span', { class: 'muted', text: `${r.online} online` }),
    h('button', {
      class: 'small', text: joined ? 'Open' : 'Join', 'aria-label': `${joined ? 'Open' : 'Join'} #${r.name}`,
      onclick: () => { $('rooms-dialog').close(); hooks.onJoin(r.name); },
    }));
}

async function loadRooms(fresh) {
  if (fresh) roomsAfter = null;
  try {
    const { rooms } = await api.request('GET', api.withQuery('/api/rooms', { after: roomsAfter, limit: ROOM_PAGE }));
    for (const r of rooms) state.roomOnline.set(r.name, r.online);
    const items = rooms.map(roomItem);
    if (fresh) $('all-rooms').replaceChildren(...items);
    else $('all-rooms').append(...items);
    if (rooms.length) roomsAfter = rooms[rooms.length - 1].name;
    $('rooms-more').hidden = rooms.length < ROOM_PAGE;
  } catch (e) {
    $('rooms-error').textContent = actionError(e);
  }
}

export function openRooms() {
  $('rooms-error').textContent = '';
  $('new-room').value = '';
  openDialog($('rooms-dialog'), $('new-room'));
  loadRooms(true);
}

async function searchUsers() {
  const q = $('dm-q').value.trim();
  try {
    const { users } = await api.request('GET', api.withQuery('/api/users', { q, limit: 20 }));
    $('dm-error').textContent = '';
    const others = users.filter((u) => u.username !== state.me.username);
    $('dm-users').replaceChildren(...(others.length ? others.map((u) => h('li', {},
      h('span', { class: `presence-dot${u.online ? ' on' : ''}`, 'aria-hidden': 'true' }),
      h('span', { class: 'pick-name', text: u.username }),
      h('span', { class: 'muted', text: u.online ? 'online' : 'offline' }),
      h('button', {
        class: 'small', text: 'Message', 'aria-label': `Message ${u.username}`,
        onclick: () => { $('dm-dialog').close(); hooks.onDm(u.username); },
      }))) : [h('li', { class: 'muted', text: 'Nobody by that name.' })]));
  } catch (e) {
    $('dm-error').textContent = actionError(e);
  }
}

export function openDirectory() {
  $('dm-q').value = '';
  $('dm-error').textContent = '';
  openDialog($('dm-dialog'), $('dm-q'));
  searchUsers();
}

/** @param {{onJoin(room), onDm(username)}} handlers */
export function initDialogs(handlers) {
  hooks = handlers;
  $('rooms-more').addEventListener('click', () => loadRooms(false));
  $('create-room').addEventListener('submit', async (e) => {
    e.preventDefault();
    const name = $('new-room').value.trim().toLowerCase();
    if (!ROOM.test(name)) {
      $('rooms-error').textContent = 'A room name is 1–64 characters: a–z, 0–9, _ or -.';
      return;
    }
    try {
      await api.request('POST', '/api/rooms', { name });
    } catch (err) {
      if (err.code !== 'conflict') {
        $('rooms-error').textContent = err.code === 'forbidden'
          ? 'You may not create rooms on this server.'
          : actionError(err);
        return;
      }
      // It exists already: join it.
    }
    $('rooms-dialog').close();
    hooks.onJoin(name);
  });
  $('dm-q').addEventListener('input', () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(searchUsers, 200);
  });
}
