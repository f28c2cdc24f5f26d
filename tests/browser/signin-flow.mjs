// A person in a real browser (Debian's chromium, headless, driven by
// playwright-core) behind nginx configured as ingress-nginx configures
// itself. Run by tests/integration/test_browser.py, which starts the stack
// and passes:
//   BASE       the ingress, e.g. http://127.0.0.1:PORT
//   USERNAME, PASSWORD
//   SHOTS      where the screenshots go
//   POLICY     JSON {session, token, renew, grace} in seconds
// Every page is used with JavaScript off (the sign-in page must not need
// it) in a phone-sized viewport (390x844). Exits non-zero on the first
// failed check.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const BASE = process.env.BASE;
const USERNAME = process.env.USERNAME;
const PASSWORD = process.env.PASSWORD;
const SHOTS = process.env.SHOTS;
const POLICY = JSON.parse(process.env.POLICY);
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const COOKIE = 'tokenpolicy';
const VIEWPORT = { width: 390, height: 844 };
const SIGNED_OUT = 'You have been signed out.';
const EXPIRED = 'Your session has expired. Please sign in again.';

const log = (...a) => console.log(`[${new Date().toISOString().slice(11, 23)}]`, ...a);
const sleepUntil = async (ms) => { const d = ms - Date.now(); if (d > 0) await new Promise((r) => setTimeout(r, d)); };
const claims = (jwt) => JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString());

fs.mkdirSync(SHOTS, { recursive: true });
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'tokenpolicy-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: CHROMIUM,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  viewport: VIEWPORT,
  javaScriptEnabled: false,
});
const page = context.pages()[0] || await context.newPage();

async function cookieToken() {
  const c = (await context.cookies(BASE)).find((c) => c.name === COOKIE);
  return c ? c.value : null;
}

// The sign-in page: the form is there, visible without scrolling sideways.
async function checkSigninPage(what) {
  assert.match(page.url(), new RegExp(`^${BASE}/v1/login\\?`), `${what}: not on the sign-in page: ${page.url()}`);
  assert.equal(await page.title(), 'Sign in', what);
  const vw = VIEWPORT.width;
  for (const sel of ['input[name=username]', 'input[name=password]', 'button[type=submit]']) {
    const box = await page.locator(sel).boundingBox();
    assert.ok(box, `${what}: ${sel} not rendered`);
    assert.ok(box.x >= 0 && box.x + box.width <= vw, `${what}: ${sel} outside the ${vw}px viewport: ${JSON.stringify(box)}`);
    assert.ok(box.y + box.height <= VIEWPORT.height, `${what}: ${sel} below the fold: ${JSON.stringify(box)}`);
  }
  // No horizontal scroll: nothing on the page is wider than the viewport.
  const widest = await page.locator('body *').evaluateAll((els) => Math.max(...els.map((e) => e.getBoundingClientRect().right)));
  const scroll = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(widest <= vw && scroll <= vw, `${what}: wider than the viewport (${widest}px, scrollWidth ${scroll})`);
}

async function signIn(username, password) {
  await page.fill('input[name=username]', username);
  await page.fill('input[name=password]', password);
  const [resp] = await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
  return resp;
}

// The app page (the echo upstream): what it was sent.
async function appSeen(what, url) {
  assert.equal(page.url(), url, `${what}: not on the app page`);
  const echo = JSON.parse(await page.locator('#echo').textContent());
  assert.equal(echo.headers['X-Auth-Request-User'], USERNAME, `${what}: identity header`);
  return echo;
}

// Navigate to an app URL and expect the app itself, with no redirect.
async function useApp(what, url) {
  const resp = await page.goto(url);
  assert.equal(resp.status(), 200, `${what}: status ${resp.status()}`);
  assert.equal(resp.request().redirectedFrom(), null, `${what}: redirected (visible interruption)`);
  return appSeen(what, url);
}

const shot = async (name) => { await page.screenshot({ path: path.join(SHOTS, name), fullPage: true }); log('screenshot', name); };

try {
  // 1. Opens the app, is sent to the sign-in page.
  const wanted = `${BASE}/app/page?x=1`;
  await page.goto(wanted);
  await checkSigninPage('first visit');
  assert.equal(new URL(page.url()).searchParams.get('rd'), wanted);
  assert.equal(await page.locator('.note, .err').count(), 0, 'first visit: no notice expected');
  await shot('signin.png');

  // 2. A wrong password: the page says so and keeps rd.
  let resp = await signIn(USERNAME, 'wrong-password');
  assert.equal(resp.status(), 401);
  assert.match(await page.locator('.err').textContent(), /username or password/i);
  assert.equal(await page.locator('input[name=rd]').getAttribute('value'), wanted);
  await shot('signin-wrong-password.png');

  // 3. Too many attempts (another user name, so the real one stays usable).
  let status = 0;
  for (let i = 0; i < 10 && status !== 429; i++) {
    resp = await signIn('mallory', `guess-${i}`);
    status = resp.status();
  }
  assert.equal(status, 429, 'never throttled');
  assert.match(await page.locator('.err').textContent(), /too many/i);
  await shot('signin-too-many-attempts.png');

  // 4. Signs in and lands on the page asked for. Just after a whole second,
  // so that the token times below are a few tenths away from boundaries.
  await sleepUntil(Math.floor(Date.now() / 1000) * 1000 + 1050);
  resp = await signIn(USERNAME, PASSWORD);
  assert.equal(resp.status(), 200);
  const first = await appSeen('after sign-in', wanted);
  let token = await cookieToken();
  assert.ok(token, 'no cookie after sign-in');
  const c1 = claims(token);
  const sessionEnd = c1.auth_time + POLICY.session;
  log('signed in; session ends at', sessionEnd, 'token exp', c1.exp);
  assert.ok(first.headers.Cookie.includes(token));

  // 5. Keeps using the app across token expiries: each expired token is
  // renewed through the cookie during an ordinary page load.
  let renewals = 0;
  for (let n = 1; ; n++) {
    const exp = claims(token).exp;
    if (exp >= sessionEnd) break;
    await sleepUntil((exp + 0.4) * 1000);
    const echo = await useApp(`renewal ${n}`, `${BASE}/app/step-${n}`);
    assert.ok(echo.headers.Cookie.includes(token), `renewal ${n}: the browser did not send the expired cookie`);
    const renewed = await cookieToken();
    assert.ok(renewed && renewed !== token, `renewal ${n}: the cookie was not renewed`);
    assert.equal(claims(renewed).sid, c1.sid);
    const next = await useApp(`after renewal ${n}`, `${BASE}/app/after-${n}`);
    assert.ok(next.headers.Cookie.includes(renewed), `after renewal ${n}: old cookie sent`);
    token = renewed;
    renewals++;
  }
  assert.ok(renewals >= 2, `only ${renewals} renewals before the session end`);
  log(renewals, 'renewals without interruption');

  // 6. At the session end: back to sign-in, told the session expired.
  await sleepUntil((sessionEnd + 0.4) * 1000);
  await page.goto(`${BASE}/app/late`);
  await checkSigninPage('after the session end');
  assert.equal((await page.locator('.note').textContent()).trim(), EXPIRED);
  await shot('signin-session-expired.png');

  // 7. Signs in again from there, lands on the app, and signs out.
  resp = await signIn(USERNAME, PASSWORD);
  assert.equal(resp.status(), 200);
  await appSeen('signed in again', `${BASE}/app/late`);
  assert.notEqual(claims(await cookieToken()).sid, c1.sid, 'a new session');
  const [out] = await Promise.all([page.waitForNavigation(), page.click('text=Sign out')]);
  assert.equal(out.status(), 200);
  await checkSigninPage('after signing out');
  assert.equal((await page.locator('.note').textContent()).trim(), SIGNED_OUT);
  assert.notEqual(SIGNED_OUT, EXPIRED);
  assert.equal(await cookieToken(), null, 'cookie kept after signing out');
  await shot('signin-signed-out.png');

  // 8. The app sends a signed-out browser to sign in again.
  await page.goto(`${BASE}/app/after-sign-out`);
  await checkSigninPage('app after signing out');
  log('browser flow passed');
} finally {
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
