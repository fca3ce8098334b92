// With access tokens that live 4 s, the page renews before each expiry (REST refresh
// under a Web Lock, then the socket's `refresh`), so it stays connected and keeps
// chatting over several expiries — with two tabs of one browser sharing the refresh
// cookie, both stay logged in, and no refresh ever leans on the grace or counts as reuse.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Server, launch, newPage, open, signIn, connected, say, seesMessage, noProblems } from './harness.mjs';

const TTL = 4;
let server;
let browser;

before(async () => {
  server = await new Server(['--access-ttl', String(TTL)]).start();
  await server.user('root');
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await server?.close();
});

/** Records every connection state the page shows. */
function watchStatus(page) {
  return page.evaluate(() => {
    window.__states = [];
    const el = document.getElementById('conn');
    new MutationObserver(() => window.__states.push(el.dataset.status))
      .observe(el, { attributes: true, attributeFilter: ['data-status'] });
  });
}

test('two tabs stay connected and logged in over several expiries', async () => {
  const ctx = await browser.newContext();
  const tab1 = await newPage(ctx);
  const tab2 = await newPage(ctx);
  await signIn(tab1, server, 'alice');
  await open(tab2, server);
  await connected(tab2);
  assert.equal(await tab2.locator('#me').textContent(), 'alice');
  await watchStatus(tab1);
  await watchStatus(tab2);

  const rounds = 8; // 8 × 2 s = 4 lifetimes
  for (let i = 0; i < rounds; i++) {
    const [from, to] = i % 2 ? [tab2, tab1] : [tab1, tab2];
    await say(from, `round ${i}`);
    await seesMessage(to, `round ${i}`);
    await from.waitForTimeout(2000);
  }
  for (const tab of [tab1, tab2]) {
    assert.deepEqual(await tab.evaluate(() => window.__states), [], 'the socket never dropped');
    assert.equal(await tab.locator('#conn').getAttribute('data-status'), 'connected');
    assert.equal(await tab.locator('#app-view').isVisible(), true);
  }
  // the cookie chain is intact: a reload still logs in
  await tab1.reload();
  await connected(tab1);
  await seesMessage(tab1, `round ${rounds - 1}`);

  const admin = (await server.api('POST', '/api/login', { username: 'root', password: 'password-1' })).body.access_token;
  const { events } = (await server.api('GET', '/api/admin/audit?limit=1000', undefined, admin)).body;
  const count = (a) => events.filter((e) => e.action === a && (e.actor === 'alice' || e.target === 'alice')).length;
  assert.ok(count('refresh') >= 2 * (rounds * 2) / TTL - 2, `refreshes: ${count('refresh')}`);
  assert.equal(count('refresh_reuse'), 0);
  assert.equal(count('refresh_retry'), 0, 'tabs take turns under the lock');
  assert.equal(events.filter((e) => e.action === 'ws_disconnect' && e.actor === 'alice' && e.detail?.code === 4001).length, 0);

  // logging out in one tab logs the other out too
  await tab2.locator('#logout-btn').click();
  await tab2.locator('#auth-view').waitFor({ state: 'visible' });
  await tab1.locator('#auth-error', { hasText: 'You logged out in another tab.' }).waitFor();
  noProblems(tab1, tab2);
});
