// A 360 px wide phone: the room list and the composer are on screen with no
// horizontal scroll, in the chat, a DM, and the online list; dark mode too.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Server, launch, newPage, open, signIn, say, seesMessage, shot, noProblems } from './harness.mjs';

let server;
let browser;

before(async () => {
  server = await new Server().start();
  await server.user('root');
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await server?.close();
});

async function noSideScroll(page) {
  const w = await page.evaluate(() => ({
    doc: document.documentElement.scrollWidth,
    body: document.body.scrollWidth,
    view: window.innerWidth,
  }));
  assert.ok(w.doc <= w.view && w.body <= w.view, `scroll width ${w.doc}/${w.body} > ${w.view}`);
}

async function onScreen(page, selector) {
  // lists are re-rendered on every presence change: measure a node that stays put
  let box = null;
  for (let i = 0; i < 10 && !box; i++) {
    await page.locator(selector).first().waitFor();
    box = await page.locator(selector).first().boundingBox();
  }
  assert.ok(box, `${selector} is not rendered`);
  const vp = page.viewportSize();
  assert.ok(box.x >= 0 && box.y >= 0 && box.x + box.width <= vp.width && box.y + box.height <= vp.height,
    `${selector} is off screen: ${JSON.stringify(box)}`);
}

for (const scheme of ['light', 'dark']) {
  test(`360 px wide (${scheme}): room list and composer, no horizontal scroll`, async () => {
    const ctx = await browser.newContext({ viewport: { width: 360, height: 740 }, colorScheme: scheme, hasTouch: true });
    const page = await newPage(ctx);
    await open(page, server);
    await page.locator('#auth-view').waitFor();
    await noSideScroll(page);
    if (scheme === 'light') await shot(page, 'phone-login');
    const name = `phone_${scheme}`;
    await signIn(page, server, name);
    await say(page, 'typing on a phone, with a long unbroken word: supercalifragilisticexpialidocious-and-then-some-more-characters');
    await seesMessage(page, 'typing on a phone');
    await onScreen(page, '#room-list button.conv');
    await onScreen(page, '#composer-input');
    await onScreen(page, '#composer button[type="submit"]');
    await noSideScroll(page);
    await shot(page, `phone-${scheme}`);

    // the online list opens over the chat
    await page.locator('#online-toggle').click();
    await page.locator(`#online-list li[data-user="${name}"]`).waitFor();
    await onScreen(page, '#online-list li');
    await noSideScroll(page);
    await page.locator('#online-toggle').click();

    // a DM
    await page.locator('#dm-btn').click();
    await page.locator('#dm-q').fill('roo');
    await page.getByRole('button', { name: 'Message root' }).click();
    await say(page, 'hello from my phone');
    await seesMessage(page, 'hello from my phone');
    await onScreen(page, '#composer-input');
    await noSideScroll(page);
    noProblems(page);
    await ctx.close();
  });
}
