// Logging in and out, and every refusal said in words: wrong password, name taken,
// invalid name or password (checked before asking), registration closed, too many
// attempts with the wait, and logout that really ends the login (a reload stays out).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Server, launch, newPage, open, signIn, noProblems } from './harness.mjs';

let server;
let closed;
let browser;

before(async () => {
  server = await new Server().start();
  closed = await new Server(['--registration', 'closed', '--login-rate', '2']).start();
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await server?.close();
  await closed?.close();
});

async function attempt(page, button, name, password) {
  await page.locator('#auth-username').fill(name);
  await page.locator('#auth-password').fill(password);
  await page.locator(button).click();
}

async function says(page, pattern) {
  await page.locator('#auth-error').filter({ hasText: pattern }).waitFor();
}

test('logout ends the login: a reload stays logged out', async () => {
  const page = await newPage(await browser.newContext());
  await signIn(page, server, 'alice');
  await page.locator('#logout-btn').click();
  await page.locator('#auth-view').waitFor({ state: 'visible' });
  await page.reload();
  await page.locator('#auth-view').waitFor({ state: 'visible' });
  assert.equal(await page.locator('#app-view').isVisible(), false);
  noProblems(page);
});

test('refusals in words on an open server', async () => {
  const page = await newPage(await browser.newContext());
  await open(page, server);
  await attempt(page, '#login-btn', 'alice', 'wrong-password');
  await says(page, 'Wrong username or password.');
  await attempt(page, '#login-btn', 'nobody', 'whatever-1');
  await says(page, 'Wrong username or password.');
  await attempt(page, '#register-btn', 'ALICE', 'password-2');
  await says(page, 'That username is taken');
  await attempt(page, '#register-btn', 'a!', 'password-2');
  await says(page, 'A username is 3–32 characters');
  await attempt(page, '#register-btn', 'carol', 'short');
  await says(page, 'at least 8 characters');
  await attempt(page, '#register-btn', 'carol', 'x'.repeat(73));
  await says(page, 'too long');
  await attempt(page, '#login-btn', 'alice', 'password-1');
  await page.locator('#app-view').waitFor({ state: 'visible' });
  noProblems(page);
});

test('registration closed, and too many attempts with the wait', async () => {
  const page = await newPage(await browser.newContext());
  await open(page, closed);
  await attempt(page, '#register-btn', 'dave', 'password-1');
  await says(page, 'Registration is closed');
  for (let i = 0; i < 3; i++) await attempt(page, '#login-btn', 'dave', `wrong-${i}-password`).then(() => page.waitForTimeout(1500));
  await says(page, /Too many attempts\. Try again in \d+ (s|min)\./);
  noProblems(page);
});
