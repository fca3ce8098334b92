// The server is stopped (SIGTERM) and started again on the same database and port
// while two pages are open and one has a message pending: both reconnect by
// themselves, the pending message arrives exactly once, and chatting goes on. Then a
// lost ack: the page resends after a reconnect and the server's once-only rule keeps
// the message single. And a reload with a message pending keeps it and sends it once.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Server, launch, newPage, signIn, connected, say, bodies, seesMessage, noProblems } from './harness.mjs';

let server;
let browser;
let alice;
let bob;

before(async () => {
  server = await new Server().start();
  browser = await launch();
  alice = await newPage(await browser.newContext());
  bob = await newPage(await browser.newContext());
  await signIn(alice, server, 'alice');
  await signIn(bob, server, 'bob');
  await say(alice, 'before the restart');
  await seesMessage(bob, 'before the restart');
});

after(async () => {
  await browser?.close();
  await server?.close();
});

async function stored(room) {
  const token = (await server.api('POST', '/api/login', { username: 'bob', password: 'password-1' })).body.access_token;
  const r = await server.api('GET', `/api/rooms/${room}/messages?limit=200`, undefined, token);
  return r.body.messages.map((m) => m.body);
}

test('a restart with a message pending: both reconnect, it arrives once, chat goes on', async () => {
  await server.stop();
  for (const p of [alice, bob]) {
    await p.locator('#conn:not([data-status="connected"])').waitFor();
  }
  await alice.locator('#conn-text', { hasText: 'restarting' }).waitFor();
  await say(alice, 'sent while the server was down');
  await alice.locator('#pending-list .msg', { hasText: 'sent while the server was down' }).waitFor();
  assert.match(await alice.locator('#pending-list .state').textContent(), /Waiting for the connection/);

  await server.start();
  await connected(alice, 30000);
  await connected(bob, 30000);
  await seesMessage(bob, 'sent while the server was down', 15000);
  await alice.locator('#pending-list .msg').waitFor({ state: 'detached' });
  await say(bob, 'welcome back');
  await seesMessage(alice, 'welcome back');

  const expected = ['before the restart', 'sent while the server was down', 'welcome back'];
  assert.deepEqual(await bodies(alice), expected);
  assert.deepEqual(await bodies(bob), expected);
  assert.deepEqual(await stored('general'), expected);
  noProblems(alice, bob);
});

test('an ack lost with the connection: the resend is answered, not stored twice', async () => {
  // Drop the server's frames to alice right after her send leaves, as if the
  // connection died before the ack came back; then cut it so the page reconnects.
  await alice.evaluate(() => {
    const real = WebSocket.prototype.send;
    WebSocket.prototype.send = function send(data) {
      real.call(this, data);
      if (JSON.parse(data).type === 'send' && !window.__cut) {
        window.__cut = true;
        this.onmessage = null;
        setTimeout(() => this.close(), 300);
      }
    };
  });
  await say(alice, 'acked into the void');
  await seesMessage(bob, 'acked into the void');
  await connected(alice, 30000);
  await alice.locator('#pending-list .msg').waitFor({ state: 'detached' });
  await seesMessage(alice, 'acked into the void');
  await say(bob, 'still here');
  await seesMessage(alice, 'still here');
  const count = (list) => list.filter((b) => b === 'acked into the void').length;
  assert.equal(count(await bodies(alice)), 1);
  assert.equal(count(await bodies(bob)), 1);
  assert.equal(count(await stored('general')), 1);
});

test('the device goes offline and back: the page says so, reconnects and catches up', async () => {
  await alice.context().setOffline(true);
  await alice.locator('#conn[data-status="offline"]', { hasText: 'this device is offline' }).waitFor();
  await say(bob, 'while you were away');
  await seesMessage(bob, 'while you were away');
  await alice.context().setOffline(false);
  await connected(alice, 30000);
  await seesMessage(alice, 'while you were away');
  assert.equal((await bodies(alice)).filter((b) => b === 'while you were away').length, 1);
});

test('a reload with a message pending: it is kept, sent after the reload, and stored once', async () => {
  // The page's sends of this message go nowhere, as if the connection died under it.
  await alice.evaluate(() => {
    const real = WebSocket.prototype.send;
    WebSocket.prototype.send = function send(data) {
      if (!String(data).includes('kept through a reload')) real.call(this, data);
    };
  });
  await say(alice, 'kept through a reload');
  await alice.locator('#pending-list .msg', { hasText: 'kept through a reload' }).waitFor();
  await alice.waitForTimeout(500);
  assert.ok(!(await stored('general')).includes('kept through a reload'), 'not sent before the reload');

  await alice.reload();
  await connected(alice, 30000);
  await seesMessage(bob, 'kept through a reload', 15000);
  await seesMessage(alice, 'kept through a reload');
  await alice.locator('#pending-list .msg').waitFor({ state: 'detached' });
  const count = (list) => list.filter((b) => b === 'kept through a reload').length;
  assert.equal(count(await bodies(alice)), 1);
  assert.equal(count(await bodies(bob)), 1);
  assert.equal(count(await stored('general')), 1);
  assert.equal(await alice.evaluate(() => sessionStorage.getItem('parley.outbox.alice')), '[]');

  // A saved outbox that is not what the page wrote (garbage, or entries of the wrong
  // shape) is ignored: the page loads, sends nothing, and keeps working.
  for (const junk of ['{not json', JSON.stringify([{ clientId: 1, kind: 'room', target: 'general', body: 'odd' }, 'x', null])]) {
    await alice.evaluate((v) => sessionStorage.setItem('parley.outbox.alice', v), junk);
    await alice.reload();
    await connected(alice, 30000);
    assert.equal(await alice.locator('#pending-list .msg').count(), 0);
  }
  await say(alice, 'after the junk');
  await seesMessage(bob, 'after the junk');
  assert.ok(!(await stored('general')).includes('odd'));
  noProblems(alice, bob);
});
