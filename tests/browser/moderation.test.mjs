// Roles in the web client: a member sees no moderation or admin controls; the admin
// makes someone a moderator in the admin view; the moderator deletes a message (it
// disappears for everyone) and kicks a member; the admin announces, reads the audit
// trail and bans a member, whose page says why it was disconnected.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Server, launch, newPage, signIn, connected, say, bodies, seesMessage, shot, noProblems } from './harness.mjs';

let server;
let browser;
let root; // admin (first account)
let mia; // member
let mod; // becomes moderator

before(async () => {
  server = await new Server().start();
  browser = await launch();
  const ctx = () => browser.newContext({ viewport: { width: 1200, height: 760 } });
  root = await newPage(await ctx());
  mia = await newPage(await ctx());
  mod = await newPage(await ctx());
});

after(async () => {
  await browser?.close();
  await server?.close();
});

test('a member sees no moderation or admin controls', async () => {
  await signIn(root, server, 'root');
  await signIn(mia, server, 'mia');
  await say(root, 'welcome');
  await say(mia, 'thanks');
  await seesMessage(mia, 'welcome');
  await mia.locator('#online-list li[data-user="root"]').waitFor();
  assert.equal(await mia.locator('#admin-btn').isVisible(), false);
  assert.equal(await mia.locator('#message-list .del').count(), 0);
  assert.equal(await mia.locator('#online-list .kick').count(), 0);
  // the admin has them
  await seesMessage(root, 'thanks');
  assert.equal(await root.locator('#admin-btn').isVisible(), true);
  assert.equal(await root.locator('#message-list .del').count(), 2);
  await root.locator('#online-list li[data-user="mia"] .kick').waitFor();
});

test('the admin makes a moderator in the admin view', async () => {
  await server.user('moddy');
  await root.locator('#admin-btn').click();
  const row = root.locator('#user-rows tr[data-user="moddy"]');
  await row.waitFor();
  assert.equal(await row.locator('.tag').textContent(), 'active');
  await row.getByLabel('moddy: moderator').check();
  await row.getByRole('button', { name: 'Save roles' }).click();
  await root.locator('#admin-ok', { hasText: 'moddy now has: ' }).waitFor();
  assert.match(await root.locator('#admin-ok').textContent(), /moderator/);
  await shot(root, 'admin-users');
});

test('a moderator deletes a message and it disappears for the others', async () => {
  await signIn(mod, server, 'moddy', { register: false });
  await say(mia, 'delete me');
  await seesMessage(mod, 'delete me');
  await root.locator('#room-list button[data-id="general"] .badge', { hasText: '1' }).waitFor();
  assert.equal(await mod.locator('#admin-btn').isVisible(), false, 'moderators get no admin view');
  const msg = mod.locator('#message-list .msg', { hasText: 'delete me' });
  await msg.hover();
  await msg.getByRole('button', { name: 'Delete message from mia' }).click();
  await mod.locator('#confirm-ok').click();
  await root.locator('#room-list button[data-id="general"] .badge', { hasText: '1' }).waitFor({ state: 'detached' });
  await mia.locator('#message-list .msg', { hasText: 'delete me' }).waitFor({ state: 'detached' });
  await mod.locator('#message-list .msg', { hasText: 'delete me' }).waitFor({ state: 'detached' });
  assert.deepEqual(await bodies(mia), ['welcome', 'thanks']);
  // root, in the admin view, had it as unread: the count goes with it
  assert.equal(await root.locator('#room-list button[data-id="general"] .badge').count(), 0);
  assert.doesNotMatch(await root.title(), /^\(/);
});

test('a moderator kicks a member from the online list; the member sees why and comes back', async () => {
  await mod.locator('#online-list li[data-user="mia"] .kick').click();
  await mod.locator('#confirm-ok').click();
  await mia.locator('#conn[data-status="offline"]', { hasText: 'kicked' }).waitFor();
  await mia.locator('#conn-retry').click();
  await connected(mia);
});

test('an announcement is shown distinctly', async () => {
  await root.locator('#tab-announce').click();
  await root.locator('#announce-body').fill('Maintenance at noon');
  await root.getByRole('button', { name: 'Announce', exact: true }).click();
  const note = mia.locator('#announcements .announcement', { hasText: 'Maintenance at noon' });
  await note.waitFor();
  assert.match(await note.textContent(), /Announcement from root/);
  await mod.locator('#announcements .announcement').waitFor();
});

test('the admin bans a member, whose page says why it was disconnected', async () => {
  await root.locator('#tab-users').click();
  const row = root.locator('#user-rows tr[data-user="mia"]');
  await row.getByRole('button', { name: 'Ban' }).click();
  await root.locator('#confirm-ok').click();
  await root.locator('#user-rows tr[data-user="mia"] .tag.banned').waitFor();
  await mia.locator('#auth-view').waitFor({ state: 'visible' });
  assert.match(await mia.locator('#auth-error').textContent(), /banned/);
  // and logging in again is refused in words
  await mia.locator('#auth-username').fill('mia');
  await mia.locator('#auth-password').fill('password-1');
  await mia.locator('#login-btn').click();
  await mia.locator('#auth-error', { hasText: 'This account is banned.' }).waitFor();
});

test('the admin unbans her and she can log in again', async () => {
  await root.locator('#user-rows tr[data-user="mia"]').getByRole('button', { name: 'Unban' }).click();
  await root.locator('#user-rows tr[data-user="mia"] .tag', { hasText: 'active' }).waitFor();
  await mia.locator('#login-btn').click();
  await mia.locator('#app-view').waitFor({ state: 'visible' });
  await connected(mia);
});

test('the audit trail pages newest first', async () => {
  for (let i = 0; i < 60; i++) await server.api('POST', '/api/login', { username: 'mia', password: 'not-her-password' });
  await root.locator('#tab-audit').click();
  await root.locator('#audit-rows tr', { hasText: 'login_failed' }).first().waitFor();
  const ids = (await root.locator('#audit-rows tr td:first-child').allTextContents()).map(Number);
  assert.deepEqual(ids, [...ids].sort((a, b) => b - a), 'newest first');
  assert.equal(ids.length, 50);
  await root.locator('#audit-older').click();
  await root.locator('#audit-rows tr:first-child td:first-child', { hasText: String(ids[ids.length - 1] - 1) }).waitFor();
  // the older page reaches back to the ban and unban
  for (const action of ['ban', 'unban']) {
    await root.locator('#audit-rows tr').filter({ has: root.getByText(action, { exact: true }) }).first().waitFor();
  }
  await shot(root, 'admin-audit');
  await root.locator('#audit-newest').click();
  await root.locator('#audit-rows tr:first-child td:first-child', { hasText: String(ids[0]) }).waitFor();
  noProblems(root, mod);
});
