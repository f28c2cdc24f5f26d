// Signing in through the real Keycloak in a real browser (Debian's
// chromium, headless, driven by playwright-core), behind nginx configured
// as ingress-nginx configures itself. Run by
// tests/integration/test_browser_keycloak.py, which starts Keycloak and the
// stack and passes:
//   BASE          the ingress, e.g. http://127.0.0.1:PORT
//   KEYCLOAK      Keycloak's base URL (https, a test CA)
//   KC_USERNAME, KC_PASSWORD   a user of the realm
//   EXPECT        JSON {user, email, groups}: what the app must be told
//   SHOTS         where the screenshots go
// The browser opens a protected app page, is sent to our sign-in page,
// clicks the provider button, fills in Keycloak's own login form, and lands
// on the page it asked for, whose upstream got the user, email and groups
// headers. Exits non-zero on the first failed check.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const BASE = process.env.BASE;
const KEYCLOAK = process.env.KEYCLOAK;
const EXPECT = JSON.parse(process.env.EXPECT);
const SHOTS = process.env.SHOTS;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const VIEWPORT = { width: 390, height: 844 };

const log = (...a) => console.log(`[${new Date().toISOString().slice(11, 23)}]`, ...a);
fs.mkdirSync(SHOTS, { recursive: true });
const shot = async (page, name) => { await page.screenshot({ path: path.join(SHOTS, name), fullPage: true }); log('screenshot', name); };

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  // Keycloak's certificate is from the test's own CA, on 127.0.0.1 only.
  const context = await browser.newContext({ viewport: VIEWPORT, ignoreHTTPSErrors: true });
  const page = await context.newPage();

  // 1. The app sends the browser to our sign-in page, which offers Keycloak.
  const wanted = `${BASE}/app/oidc?x=1`;
  await page.goto(wanted);
  assert.match(page.url(), new RegExp(`^${BASE}/v1/login\\?`), `not on the sign-in page: ${page.url()}`);
  assert.equal(new URL(page.url()).searchParams.get('rd'), wanted);
  const button = page.getByRole('link', { name: 'Sign in with Keycloak' });
  assert.equal(await button.count(), 1, 'no provider button');
  await shot(page, 'oidc-signin.png');

  // 2. The button leads to Keycloak's own login form.
  await Promise.all([page.waitForURL((u) => u.href.startsWith(KEYCLOAK)), button.click()]);
  const form = page.locator('#kc-form-login');
  await form.waitFor();
  const authorize = new URL(page.url());
  log('at Keycloak:', authorize.origin + authorize.pathname);
  await shot(page, 'oidc-keycloak-login.png');

  // 3. Keycloak signs the user in and sends the browser back through our
  // callback to the page it asked for.
  await page.fill('#username', process.env.KC_USERNAME);
  await page.fill('#password', process.env.KC_PASSWORD);
  const callbacks = [];
  page.on('response', (r) => { if (r.url().startsWith(`${BASE}/v1/oidc/callback`)) callbacks.push(r.status()); });
  await Promise.all([
    page.waitForURL(wanted, { timeout: 30000 }),
    page.locator('#kc-login, [name=login], button[type=submit], input[type=submit]').first().click(),
  ]);
  assert.deepEqual(callbacks, [302], `our callback answered ${JSON.stringify(callbacks)}`);
  const echo = JSON.parse(await page.locator('#echo').textContent());
  const h = echo.headers;
  assert.equal(h['X-Auth-Request-User'], EXPECT.user, 'user header');
  assert.equal(h['Remote-User'], EXPECT.user, 'Remote-User header');
  assert.equal(h['X-Auth-Request-Email'], EXPECT.email, 'email header');
  assert.equal(h['X-Auth-Request-Groups'], EXPECT.groups, 'groups header');
  assert.ok(h.Cookie && h.Cookie.includes('tokenpolicy='), 'the app did not get our cookie');
  await shot(page, 'oidc-app.png');

  // 4. Our account page says how this session signed in.
  await page.goto(`${BASE}/v1/account`);
  assert.equal(await page.title(), 'Your sessions');
  assert.match(await page.locator('li.session.current').textContent(), /Signed in with Keycloak/);
  log('oidc browser flow passed for', EXPECT.user, 'groups', h['X-Auth-Request-Groups']);
} finally {
  await browser.close();
}
