// Shared by the browser tests: starts the real parley binary on a fresh database and
// an ephemeral port, launches Debian's Chromium through playwright-core (never a
// downloaded browser), and offers small helpers that drive the page like a person.
//
// PARLEY_BIN picks the binary (default: target/debug/parley, built by `cargo build`);
// CHROMIUM the browser (default /usr/bin/chromium); SHOTS=1 writes screenshots to
// docs/screenshots/.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = process.env.PARLEY_BIN ?? path.join(ROOT, 'target/debug/parley');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
export const SHOTS = path.join(ROOT, 'docs/screenshots');

/** A running server; `restart()` stops it (SIGTERM) and starts it on the same db and port. */
export class Server {
  constructor(extra = []) {
    this.dir = mkdtempSync(path.join(tmpdir(), 'parley-browser-'));
    this.db = path.join(this.dir, 'chat.db');
    this.extra = extra;
    this.addr = '127.0.0.1:0';
    this.log = [];
  }

  async start() {
    const defaults = [['--bcrypt-cost', '4'], ['--login-rate', '0'], ['--register-rate', '0']]
      .filter(([flag]) => !this.extra.includes(flag)).flat();
    const args = ['--db', this.db, '--addr', this.addr, ...defaults, ...this.extra];
    this.proc = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' } });
    this.proc.stderr.on('data', (d) => this.log.push(String(d)));
    const exited = new Promise((resolve) => this.proc.once('exit', resolve));
    this.exited = exited;
    const lines = createInterface({ input: this.proc.stdout });
    const first = await Promise.race([
      new Promise((resolve) => lines.once('line', resolve)),
      exited.then((code) => { throw new Error(`parley exited (${code}) before listening:\n${this.log.join('')}`); }),
    ]);
    const m = /listening on (http:\/\/[\d.:]+)/.exec(first);
    assert.ok(m, `unexpected first line: ${first}`);
    this.url = m[1];
    this.addr = this.url.slice('http://'.length);
    lines.on('line', () => {});
    return this;
  }

  /** SIGTERM and wait for the exit. */
  async stop() {
    if (!this.proc || this.proc.exitCode !== null) return;
    this.proc.kill('SIGTERM');
    await this.exited;
  }

  async restart() {
    await this.stop();
    await this.start();
  }

  async close() {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** A REST call from the test itself (no browser). */
  async api(method, p, body, token) {
    const headers = {};
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (token) headers.Authorization = `Bearer ${token}`;
    const res = await fetch(this.url + p, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : null };
  }

  /** Registers a user from outside the browser; returns its access token. */
  async user(name, password = 'password-1') {
    await this.api('POST', '/api/register', { username: name, password });
    const r = await this.api('POST', '/api/login', { username: name, password });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return r.body.access_token;
  }
}

/** Chromium with a fresh profile (playwright makes a new temporary user-data dir per launch). */
export function launch() {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

/**
 * A page that records console errors, page errors and dialogs (an alert would mean a
 * script ran); `problems` should stay empty.
 */
export async function newPage(context) {
  const page = await context.newPage();
  page.problems = [];
  page.failedLoads = [];
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    // A refused request (401 before login, 403 after a ban) is logged by the browser; it is
    // expected. So is a reconnect attempt that finds the server down (the restart tests stop
    // it on purpose): the browser logs it, not the page's code.
    const t = m.text();
    if (t.startsWith('Failed to load resource') || /^WebSocket connection to .* failed: .*ERR_CONNECTION_REFUSED/.test(t)) page.failedLoads.push(t);
    else page.problems.push(`console: ${m.text()}`);
  });
  page.on('pageerror', (e) => page.problems.push(`pageerror: ${e.message}`));
  page.on('dialog', async (d) => { page.problems.push(`dialog: ${d.message()}`); await d.dismiss(); });
  return page;
}

/**
 * Loads the page. The wait is generous on purpose: load.test.mjs is the test of how
 * fast a page loads (a burst of connections can wait seconds for a thread); the other
 * tests are about what the page does once loaded.
 */
export async function open(page, server) {
  await page.goto(server.url + '/', { timeout: 60000 });
}

/** Opens the app and registers (or logs in) through the form. */
export async function signIn(page, server, name, { register = true, password = 'password-1' } = {}) {
  await open(page, server);
  await page.locator('#auth-username').fill(name);
  await page.locator('#auth-password').fill(password);
  await page.locator(register ? '#register-btn' : '#login-btn').click();
  await page.locator('#app-view').waitFor({ state: 'visible' });
  await connected(page);
}

export async function connected(page, timeout = 20000) {
  await page.locator('#conn[data-status="connected"]').waitFor({ timeout });
}

/** Types and sends a message with Enter. */
export async function say(page, text) {
  const input = page.locator('#composer-input');
  await input.fill(text);
  await input.press('Enter');
}

/** The stored (not pending) messages' bodies in the open conversation. */
export function bodies(page) {
  return page.locator('#message-list .msg .body').allTextContents();
}

export async function seesMessage(page, text, timeout = 10000) {
  await page.locator('#message-list .msg .body', { hasText: text }).first().waitFor({ timeout });
}

export async function shot(page, name) {
  if (!process.env.SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`) });
}

export function noProblems(...pages) {
  for (const p of pages) assert.deepEqual(p.problems, [], 'console errors, page errors or dialogs');
}
