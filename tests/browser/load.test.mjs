// The page and its modules load promptly even when the browser opens many connections
// at once and other tabs hold sockets: a browser fetches the ES modules over up to 6
// parallel keep-alive connections, each of which holds an HTTP thread while idle.
// tiny_http's pool once queued such a burst behind its single idle thread; the queued
// connections waited for the idle reaper and were often closed unanswered
// (ERR_EMPTY_RESPONSE), and later ~2.5 s for a reaper pass. The vendored pool now
// starts a thread for each connection no idle thread is left for, so every answer
// comes at once; the bound below leaves room for a loaded CI machine only.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { Server, launch, newPage, signIn, connected } from './harness.mjs';

let server;
let browser;

before(async () => {
  server = await new Server().start();
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await server?.close();
});

/**
 * Opens `n` TCP connections at once, then sends a keep-alive GET on each; resolves
 * with the milliseconds each waited for the start of its answer (Infinity: none in
 * `limit` ms). The connections stay open while the others wait, as a browser's do.
 */
async function burst(url, n, limit) {
  const { hostname, port, pathname } = new URL(url);
  const socks = await Promise.all(Array.from({ length: n }, () => new Promise((resolve, reject) => {
    const s = net.connect(Number(port), hostname, () => resolve(s));
    s.on('error', reject);
  })));
  const t0 = Date.now();
  const times = await Promise.all(socks.map((s) => new Promise((resolve) => {
    const timer = setTimeout(() => resolve(Infinity), limit);
    s.once('data', () => { clearTimeout(timer); resolve(Date.now() - t0); });
    s.write(`GET ${pathname} HTTP/1.1\r\nHost: ${hostname}:${port}\r\nConnection: keep-alive\r\n\r\n`);
  })));
  for (const s of socks) s.destroy();
  return times;
}

test('12 connections opened at once to a fresh server are all answered at once', async () => {
  const times = await burst(`${server.url}/static/style.css`, 12, 10000);
  assert.ok(Math.max(...times) < 1000, `answers after (ms): ${times.join(', ')}`);
});

test('new tabs boot within 10 s while other tabs hold sockets', async () => {
  const ctx = await browser.newContext();
  const first = await newPage(ctx);
  await signIn(first, server, 'alice');
  const other = await newPage(await browser.newContext());
  await signIn(other, server, 'bob');
  for (let i = 0; i < 3; i++) {
    const tab = await newPage(ctx);
    const t0 = Date.now();
    await tab.goto(server.url + '/');
    await tab.locator('#app-view').waitFor({ state: 'visible', timeout: 10000 });
    await connected(tab, 10000 - (Date.now() - t0));
    assert.deepEqual(tab.failedLoads.filter((l) => !/401/.test(l)), [], `loaded in ${Date.now() - t0} ms`);
  }
});
