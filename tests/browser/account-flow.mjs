// The account page in a real browser (Debian's chromium, headless, driven
// by playwright-core) behind nginx configured as ingress-nginx configures
// itself. Run by tests/integration/test_browser.py, which starts the stack
// and passes:
//   BASE       the ingress, e.g. http://127.0.0.1:PORT
//   USERNAME, PASSWORD
//   SHOTS      where the screenshots go (account.png: the page at phone width)
// Two browsers (two contexts, each its own cookies) sign in as the same
// user; one sees both sessions on /v1/account, signs the other out (whose
// cookie is refused from then on), and signs out everywhere. JavaScript
// off, 390x844 viewport. Exits non-zero on the first failed check.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const BASE = process.env.BASE;
const USERNAME = process.env.USERNAME;
const PASSWORD = process.env.PASSWORD;
const SHOTS = process.env.SHOTS;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const COOKIE = 'tokenpolicy';
const VIEWPORT = { width: 390, height: 844 };
const SIGNED_OUT = 'You have been signed out.';
const ENDED = 'That session has been signed out.';

const log = (...a) => console.log(`[${new Date().toISOString().slice(11, 23)}]`, ...a);
const claims = (jwt) => JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString());

fs.mkdirSync(SHOTS, { recursive: true });
const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});

// One person's browser: its own cookies and a user agent that names it.
async function person(name) {
  const context = await browser.newContext({
    viewport: VIEWPORT,
    javaScriptEnabled: false,
    userAgent: `Mozilla/5.0 (tokenpolicy browser test; ${name}) Chromium`,
  });
  const page = await context.newPage();
  const token = async () => {
    const c = (await context.cookies(BASE)).find((c) => c.name === COOKIE);
    return c ? c.value : null;
  };
  return { name, context, page, token };
}

// Nothing on the page is wider than the phone's viewport.
async function fitsThePhone(page, what) {
  const vw = VIEWPORT.width;
  const widest = await page.locator('body *').evaluateAll((els) => Math.max(...els.map((e) => e.getBoundingClientRect().right)));
  const scroll = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(widest <= vw && scroll <= vw, `${what}: wider than the viewport (${widest}px, scrollWidth ${scroll})`);
}

async function onSigninPage(p, what) {
  assert.match(p.page.url(), new RegExp(`^${BASE}/v1/login\\?`), `${what}: not on the sign-in page: ${p.page.url()}`);
  assert.equal(await p.page.title(), 'Sign in', what);
}

// Opens the account page without a session: sent to sign in, and back.
async function signInThroughTheAccountPage(p) {
  await p.page.goto(`${BASE}/v1/account`);
  await onSigninPage(p, `${p.name}: account page without a session`);
  assert.equal(new URL(p.page.url()).searchParams.get('rd'), '/v1/account');
  await p.page.fill('input[name=username]', USERNAME);
  await p.page.fill('input[name=password]', PASSWORD);
  const [resp] = await Promise.all([p.page.waitForNavigation(), p.page.click('button[type=submit]')]);
  assert.equal(resp.status(), 200, `${p.name}: sign-in`);
  assert.equal(p.page.url(), `${BASE}/v1/account`, `${p.name}: not back on the account page`);
  const t = await p.token();
  assert.ok(t, `${p.name}: no cookie after sign-in`);
  return claims(t).sid;
}

const sessionsOn = (page) => page.locator('li.session');

// Clicks a form's button and waits for where it leads.
async function submit(page, locator) {
  const [resp] = await Promise.all([page.waitForNavigation(), locator.click()]);
  return resp;
}

try {
  const laptop = await person('laptop');
  const phone = await person('phone');
  const laptopSid = await signInThroughTheAccountPage(laptop);
  const phoneSid = await signInThroughTheAccountPage(phone);
  assert.notEqual(laptopSid, phoneSid);

  // The phone sees both sessions, its own marked and first.
  await phone.page.goto(`${BASE}/v1/account`);
  assert.equal(await phone.page.title(), 'Your sessions');
  assert.equal(await sessionsOn(phone.page).count(), 2);
  const mine = phone.page.locator('li.session.current');
  assert.equal(await mine.count(), 1);
  assert.equal(await mine.getAttribute('data-sid'), phoneSid);
  assert.equal(await sessionsOn(phone.page).first().getAttribute('data-sid'), phoneSid);
  const other = phone.page.locator(`li.session[data-sid="${laptopSid}"]`);
  assert.match(await other.textContent(), /tokenpolicy browser test; laptop/);
  assert.match(await mine.textContent(), /tokenpolicy browser test; phone/);
  assert.match(await other.textContent(), /Signed in with a password/);
  assert.match(await other.textContent(), /127\.0\.0\.1/);
  await fitsThePhone(phone.page, 'account page');
  const button = await other.locator('button').boundingBox();
  assert.ok(button && button.x >= 0 && button.x + button.width <= VIEWPORT.width, 'sign-out button outside the viewport');
  await phone.page.screenshot({ path: path.join(SHOTS, 'account.png'), fullPage: true });
  log('screenshot account.png');

  // The laptop works until the phone signs it out.
  let resp = await laptop.page.goto(`${BASE}/app/before`);
  assert.equal(resp.status(), 200);
  assert.equal(laptop.page.url(), `${BASE}/app/before`);
  resp = await submit(phone.page, other.locator('button'));
  assert.equal(resp.status(), 200);
  assert.equal(phone.page.url(), `${BASE}/v1/account?done=session-ended`);
  assert.equal((await phone.page.locator('.note').textContent()).trim(), ENDED);
  assert.equal(await sessionsOn(phone.page).count(), 1);
  assert.equal(await phone.page.locator('li.session.current').getAttribute('data-sid'), phoneSid);

  // The laptop's cookie is refused: the app sends it to sign in, told why.
  await laptop.page.goto(`${BASE}/app/after`);
  await onSigninPage(laptop, 'laptop after being signed out');
  assert.equal((await laptop.page.locator('.note').textContent()).trim(), SIGNED_OUT);
  const r = await laptop.context.request.get(`${BASE}/v1/account`, { maxRedirects: 0 });
  assert.equal(r.status(), 303, 'the laptop still reaches the account page');

  // The laptop signs in again; the phone signs out everywhere.
  const laptopSid2 = await signInThroughTheAccountPage(laptop);
  await phone.page.goto(`${BASE}/v1/account`);
  assert.equal(await sessionsOn(phone.page).count(), 2);
  resp = await submit(phone.page, phone.page.getByRole('button', { name: 'Sign out everywhere' }));
  assert.equal(resp.status(), 200);
  await onSigninPage(phone, 'phone after signing out everywhere');
  assert.equal((await phone.page.locator('.note').textContent()).trim(), SIGNED_OUT);
  assert.equal(await phone.token(), null, 'cookie kept after signing out everywhere');
  await laptop.page.goto(`${BASE}/app/after-everywhere`);
  await onSigninPage(laptop, `laptop (${laptopSid2}) after sign-out everywhere`);
  log('account flow passed');
} finally {
  await browser.close();
}
