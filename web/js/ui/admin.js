/**
 * ui/admin.js — the admin view (only shown to admins; the server refuses others
 * anyway): users with their roles, ban state and open sockets (GET /api/admin/users,
 * paged by name), role changes (PUT .../roles), ban and unban, the audit trail paged
 * newest first (GET /api/admin/audit?before=), and announcements.
 */
import { h, $, confirmAction } from './dom.js';
import * as api from '../api.js';
import { actionError, fullTime } from '../format.js';

const ROLES = ['admin', 'moderator', 'member'];
const PAGE = 50;

let usersAfter = null;
let auditBefore = null;
let auditNewest = true;

function fail(e) {
  $('admin-error').textContent = actionError(e);
  $('admin-ok').textContent = '';
}

function ok(text = '') {
  $('admin-error').textContent = '';
  $('admin-ok').textContent = text;
}

function userRow(u) {
  const boxes = ROLES.map((r) => h('label', { class: 'role' },
    h('input', { type: 'checkbox', value: r, checked: u.roles.includes(r), 'aria-label': `${u.username}: ${r}` }),
    ` ${r}`));
  const row = h('tr', { dataset: { user: u.username } },
    h('th', { scope: 'row', text: u.username }),
    h('td', {}, h('div', { class: 'roles' }, boxes)),
    h('td', {},
      h('span', { class: u.banned ? 'tag banned' : 'tag', text: u.banned ? 'banned' : 'active' }),
      h('span', { class: 'muted', text: ` ${u.sockets} socket${u.sockets === 1 ? '' : 's'}` })),
    h('td', { class: 'actions' },
      h('button', { class: 'small', text: 'Save roles', onclick: () => saveRoles(u.username, row) }),
      u.banned
        ? h('button', { class: 'small', text: 'Unban', onclick: () => setBan(u.username, false) })
        : h('button', { class: 'small danger', text: 'Ban', onclick: () => setBan(u.username, true) })));
  return row;
}

async function saveRoles(username, row) {
  const roles = [...row.querySelectorAll('input[type=checkbox]:checked')].map((i) => i.value);
  try {
    const { user } = await api.request('PUT', `/api/admin/users/${api.seg(username)}/roles`, { roles });
    ok(`${user.username} now has: ${user.roles.join(', ') || 'no roles'}.`);
    loadUsers(true);
  } catch (e) { fail(e); }
}

async function setBan(username, ban) {
  if (ban && !(await confirmAction(`Ban ${username}? Their sockets close at once and they cannot log in.`, 'Ban'))) return;
  try {
    await api.request('POST', `/api/admin/users/${api.seg(username)}/${ban ? 'ban' : 'unban'}`);
    ok(`${username} is ${ban ? 'banned' : 'no longer banned'}.`);
    loadUsers(true);
  } catch (e) { fail(e); }
}

/** First page (fresh) or the next one. */
async function loadUsers(fresh) {
  if (fresh) usersAfter = null;
  const q = $('user-q').value.trim();
  try {
    const { users } = await api.request('GET', api.withQuery('/api/admin/users', { q, after: usersAfter, limit: PAGE }));
    const rows = users.map(userRow);
    if (fresh) $('user-rows').replaceChildren(...rows);
    else $('user-rows').append(...rows);
    if (users.length) usersAfter = users[users.length - 1].username;
    $('users-more').hidden = users.length < PAGE;
  } catch (e) { fail(e); }
}

function auditRow(ev) {
  const detail = ev.detail && Object.keys(ev.detail).length ? JSON.stringify(ev.detail) : '';
  return h('tr', {},
    h('td', { text: String(ev.id) }),
    h('td', {}, h('time', { datetime: ev.ts, text: fullTime(ev.ts) })),
    h('td', { text: ev.actor ?? '—' }),
    h('td', {}, h('span', { class: 'tag', text: ev.action })),
    h('td', { text: ev.target ?? '' }),
    h('td', { text: ev.ip ?? '' }),
    h('td', { class: 'detail', text: detail }));
}

async function loadAudit(newest) {
  if (newest) auditBefore = null;
  try {
    const { events } = await api.request('GET', api.withQuery('/api/admin/audit', { limit: PAGE, before: auditBefore }));
    if (events.length) {
      $('audit-rows').replaceChildren(...events.map(auditRow));
      auditBefore = events[events.length - 1].id;
    } else if (newest) $('audit-rows').replaceChildren();
    auditNewest = newest;
    $('audit-older').disabled = events.length < PAGE;
  } catch (e) { fail(e); }
}

function selectTab(name) {
  for (const t of ['users', 'audit', 'announce']) {
    $(`tab-${t}`).setAttribute('aria-selected', String(t === name));
    $(`admin-${t}`).hidden = t !== name;
  }
  ok();
  if (name === 'users') loadUsers(true);
  if (name === 'audit') loadAudit(auditNewest || auditBefore == null);
}

/** Called each time the admin view is shown. */
export function showAdmin() {
  const tab = ['users', 'audit', 'announce'].find((t) => $(`tab-${t}`).getAttribute('aria-selected') === 'true');
  selectTab(tab ?? 'users');
}

export function initAdmin() {
  for (const t of ['users', 'audit', 'announce']) $(`tab-${t}`).addEventListener('click', () => selectTab(t));
  // Arrow keys move between tabs, as in any tab list.
  $('tab-users').parentElement.addEventListener('keydown', (e) => {
    if (e.key !== 'ArrowRight' && e.key !== 'ArrowLeft') return;
    const tabs = [...e.currentTarget.querySelectorAll('[role=tab]')];
    const i = tabs.indexOf(document.activeElement);
    const next = tabs[(i + (e.key === 'ArrowRight' ? 1 : tabs.length - 1)) % tabs.length];
    next.focus();
    next.click();
  });
  $('user-search').addEventListener('submit', (e) => { e.preventDefault(); loadUsers(true); });
  $('users-more').addEventListener('click', () => loadUsers(false));
  $('audit-newest').addEventListener('click', () => loadAudit(true));
  $('audit-older').addEventListener('click', () => loadAudit(false));
  $('announce-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const body = $('announce-body').value.trim();
    if (!body) return;
    const roles = [...e.currentTarget.querySelectorAll('input[name=role]:checked')].map((i) => i.value);
    try {
      const res = await api.request('POST', '/api/admin/announce', roles.length ? { body, roles } : { body });
      $('announce-body').value = '';
      ok(`Announced to ${res?.sockets ?? 'every'} connected socket${res?.sockets === 1 ? '' : 's'}.`);
    } catch (err) { fail(err); }
  });
}
