// Two people chat through the web client: register, join general, talk both ways,
// see each other online, keep the session over a reload (the refresh cookie), DMs,
// rooms, keyboard use, and the XSS message shown as text with no script run and no
// CSP violation.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Server, launch, newPage, signIn, connected, say, bodies, seesMessage, shot, noProblems } from './harness.mjs';

let server;
let browser;
let alice;
let bob;

before(async () => {
  server = await new Server(['--msg-rate', '0']).start();
  await server.user('root'); // the first account is the admin; alice and bob are members
  browser = await launch();
  alice = await newPage(await browser.newContext({ viewport: { width: 1200, height: 760 } }));
  bob = await newPage(await browser.newContext({ viewport: { width: 1200, height: 760 } }));
});

after(async () => {
  await browser?.close();
  await server?.close();
});

test('two people register, join general and talk both ways; presence shows', async () => {
  await signIn(alice, server, 'alice');
  await signIn(bob, server, 'bob');
  assert.equal(await alice.locator('#conv-title').textContent(), '#general');
  await alice.locator('#online-list li[data-user="bob"]').waitFor();
  await bob.locator('#online-list li[data-user="alice"]').waitFor();

  await say(alice, 'hello bob');
  await seesMessage(bob, 'hello bob');
  await say(bob, 'hi alice');
  await seesMessage(alice, 'hi alice');
  assert.deepEqual(await bodies(alice), ['hello bob', 'hi alice']);
  assert.deepEqual(await bodies(bob), ['hello bob', 'hi alice']);
  await alice.locator('#pending-list li').waitFor({ state: 'detached' }).catch(() => {});
  assert.equal(await alice.locator('#pending-list li').count(), 0, 'nothing left pending once acked');
  // the composer is cleared and keeps focus (Enter sent it)
  assert.equal(await alice.locator('#composer-input').inputValue(), '');
});

test('a reload keeps the user logged in and shows the history', async () => {
  await bob.reload();
  await bob.locator('#app-view').waitFor({ state: 'visible' });
  await connected(bob);
  assert.equal(await bob.locator('#me').textContent(), 'bob');
  await seesMessage(bob, 'hi alice');
  assert.deepEqual(await bodies(bob), ['hello bob', 'hi alice']);
  // alice sees bob go and come back
  await alice.locator('#online-list li[data-user="bob"]').waitFor();
  await shot(alice, 'chat');
});

test('the XSS message shows literally; no script runs; no CSP violation', async () => {
  const evil = '<img src=x onerror=alert(1)>';
  await say(alice, evil);
  await seesMessage(bob, 'onerror');
  assert.equal(await bob.locator('#message-list .msg .body').last().textContent(), evil);
  assert.equal(await bob.locator('#message-list img').count(), 0);
  assert.equal(await bob.evaluate(() => window.__xss ?? null), null);
  noProblems(alice, bob);
});

test('unread counts and the tab title', async () => {
  // bob opens a second room, so general's new messages count as unread
  await bob.locator('#rooms-btn').click();
  await bob.locator('#new-room').fill('random');
  await bob.locator('#new-room').press('Enter');
  await bob.locator('#conv-title', { hasText: '#random' }).waitFor();
  await say(alice, 'are you there?');
  await bob.locator('#room-list button[data-id="general"] .badge', { hasText: '1' }).waitFor();
  assert.match(await bob.title(), /^\(1\) /);
  await bob.locator('#room-list button[data-id="general"]').click();
  await seesMessage(bob, 'are you there?');
  assert.doesNotMatch(await bob.title(), /^\(/);
});

test('leaving a room takes it off the list and back to the next one', async () => {
  await bob.locator('#room-list button[data-id="random"]').click();
  await bob.locator('#conv-title', { hasText: '#random' }).waitFor();
  await bob.locator('#leave-btn').click();
  await bob.locator('#room-list button[data-id="random"]').waitFor({ state: 'detached' });
  assert.equal(await bob.locator('#conv-title').textContent(), '#general');
  // and it stays left after a reload
  await bob.reload();
  await connected(bob);
  assert.equal(await bob.locator('#room-list button[data-id="random"]').count(), 0);
});

test('keyboard: Escape closes a dialog and focus comes back', async () => {
  await alice.locator('#rooms-btn').focus();
  await alice.keyboard.press('Enter');
  await alice.locator('#rooms-dialog[open]').waitFor();
  await alice.locator('#all-rooms li', { hasText: '#random' }).waitFor();
  await alice.keyboard.press('Escape');
  await alice.locator('#rooms-dialog[open]').waitFor({ state: 'detached' });
  assert.equal(await alice.evaluate(() => document.activeElement?.id), 'rooms-btn');
});

test('direct messages: from the user directory, both ways, listed as conversations', async () => {
  await alice.locator('#dm-btn').click();
  await alice.locator('#dm-q').fill('bo');
  await alice.locator('#dm-users li', { hasText: 'bob' }).getByRole('button', { name: 'Message bob' }).click();
  await alice.locator('#conv-title', { hasText: 'bob' }).waitFor();
  await say(alice, 'psst, bob');
  await bob.locator('#dm-list button[data-id="alice"] .badge').waitFor();
  await bob.locator('#dm-list button[data-id="alice"]').click();
  await seesMessage(bob, 'psst, bob');
  await say(bob, 'yes?');
  await seesMessage(alice, 'yes?');
  await shot(alice, 'dms');
  // after a reload the conversation is listed (GET /api/dms) and its history loads
  await alice.reload();
  await connected(alice);
  await alice.locator('#dm-list button[data-id="bob"]').click();
  await seesMessage(alice, 'yes?');
  assert.deepEqual(await bodies(alice), ['psst, bob', 'yes?']);
  noProblems(alice, bob);
});

test('history loads on scrolling up, with day separators', async () => {
  const token = await server.user('carol');
  assert.equal((await server.api('POST', '/api/rooms', { name: 'busy' }, token)).status, 201);
  await postFromPage(bob, token, 'busy', Array.from({ length: 70 }, (_, i) => `m${i}`));
  await alice.locator('#rooms-btn').click();
  await alice.locator('#all-rooms li', { hasText: '#busy' }).getByRole('button').click();
  await seesMessage(alice, 'm69');
  assert.equal(await alice.locator('#message-list .msg').count(), 50);
  assert.equal(await alice.locator('#message-list .day').first().textContent(), 'Today');
  await alice.locator('#messages').evaluate((el) => { el.scrollTop = 0; });
  await seesMessage(alice, 'm0');
  assert.equal(await alice.locator('#message-list .msg').count(), 70);
  await alice.locator('#history-status', { hasText: 'beginning' }).waitFor();
});

/** Sends `bodies` to `room` as the owner of `token`, over a socket the page opens. */
function postFromPage(page, token, room, texts) {
  return page.evaluate(async ({ token, room, texts }) => {
    const ws = new WebSocket(`ws://${location.host}/ws`, ['parley.v1', `bearer.${token}`]);
    await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = fail; });
    ws.send(JSON.stringify({ type: 'join', room }));
    let acked = 0;
    const done = new Promise((ok) => {
      ws.onmessage = (e) => { if (JSON.parse(e.data).type === 'ack' && ++acked === texts.length) ok(); };
    });
    for (const body of texts) ws.send(JSON.stringify({ type: 'send', room, body }));
    await done;
    ws.close();
  }, { token, room, texts });
}
