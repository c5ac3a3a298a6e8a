// The web client in a real headless Chromium against a real `cim up`: two pages as two users
// and one console client chat in `all`, privately both ways and in a group; `restart s1`
// makes the pages reconnect on their own and what was typed meanwhile arrives once, in order;
// a reload resumes without the password (the saved resumption secret), keeps an unsent message
// and sends it; logging out forgets the secret.
//
//   node web/browser-test/chat.mjs [--screenshot out.png]
// Needs target/debug/cim and target/debug/cim-client (cargo build -p cim -p cim-client),
// Debian's chromium (or CHROMIUM=/path), and `npm ci` in web/. Exits non-zero on a failure.

import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import assert from 'node:assert/strict';
import puppeteer from 'puppeteer-core';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const screenshot = process.argv.includes('--screenshot')
  ? process.argv[process.argv.indexOf('--screenshot') + 1] : null;
const WAIT = 30_000;
const children = [];
const tmp = mkdtempSync(join(tmpdir(), 'cim-browser-'));

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

/** A child process whose stdout lines can be awaited. */
function start(cmd, args, env = {}) {
  const child = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
  children.push(child);
  const lines = [];
  const waiters = [];
  const feed = (line) => {
    lines.push(line);
    for (const w of [...waiters]) if (w.match(line)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(line); }
  };
  createInterface({ input: child.stdout }).on('line', feed);
  createInterface({ input: child.stderr }).on('line', (l) => feed(`[stderr] ${l}`));
  return {
    child, lines,
    type: (line) => child.stdin.write(`${line}\n`),
    /** The first line (seen or to come) that `match` accepts. */
    line(match, what) {
      const seen = lines.find(match);
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        waiters.push({ match, resolve });
        setTimeout(() => reject(new Error(`${cmd}: no line ${what} within ${WAIT} ms; output:\n${lines.join('\n')}`)), WAIT);
      });
    },
  };
}

function cleanup() {
  for (const c of children) if (c.exitCode === null) c.kill('SIGINT');
  rmSync(tmp, { recursive: true, force: true });
}

const texts = (page, conv) => page.evaluate(async (conv) => {
  if (conv) document.querySelector(`#convs li[data-conv="${conv}"]`)?.click();
  return [...document.querySelectorAll('#msgs li')].map((li) => li.querySelector('.text').textContent);
}, conv);

/** Waits until `page`, showing `conv`, lists `want` (in this order, each once, among others). */
async function sees(page, conv, want) {
  try {
    await page.waitForFunction((conv, want) => {
      const li = document.querySelector(`#convs li[data-conv="${conv}"]`);
      if (!li) return false;
      if (!li.classList.contains('current')) li.click();
      const got = [...document.querySelectorAll('#msgs li .text')].map((e) => e.textContent).filter((t) => want.includes(t));
      return JSON.stringify(got) === JSON.stringify(want);
    }, { timeout: WAIT }, conv, want);
  } catch (e) {
    throw new Error(`page did not show ${JSON.stringify(want)} in ${conv}: it shows ${JSON.stringify(await texts(page, conv))} (${e.message})`);
  }
}

/** Clicks in the page itself: the lists are re-rendered often, so an element handle taken
 * a moment earlier may already be gone. */
async function tap(page, sel) {
  await page.waitForSelector(sel, { timeout: WAIT });
  await page.evaluate((s) => document.querySelector(s).click(), sel);
}

async function say(page, text) {
  await page.$eval('#text', (el, text) => { el.value = text; }, text);
  await tap(page, '#send');
}

async function register(page, name) {
  await page.waitForSelector('body[data-ready="1"]', { timeout: WAIT });
  await page.type('#name', name);
  await page.type('#password', `${name}-password`);
  await tap(page, '#register');
  await page.waitForSelector('#status.online', { timeout: WAIT });
  return page.evaluate(() => JSON.parse(localStorage.getItem('cim.last')).userId);
}

async function main() {
  const port = await freePort();
  const up = start(join(root, 'target/debug/cim'),
    // --any-ports: every other port free, WebSocket ports included (a restart keeps them).
    ['up', '--any-ports', '--route-port', String(port)],
    { RUST_LOG: 'warn', NO_COLOR: '1' });
  await up.line((l) => l.includes('Ctrl-C stops'), '"Ctrl-C stops"');
  const base = `http://127.0.0.1:${port}/`;

  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  try {
    // Two contexts: two users with storage of their own, as two browsers.
    const pages = [];
    for (let i = 0; i < 2; i++) {
      const context = await browser.createBrowserContext();
      const page = await context.newPage();
      await page.setViewport({ width: 900, height: 520 });
      page.on('pageerror', (e) => console.error(`page ${i}: ${e.message}`));
      page.on('console', (m) => { if (m.type() === 'error') console.error(`page ${i} console: ${m.text()}`); });
      const answer = await page.goto(base);
      assert.equal(answer.status(), 200);
      assert.match(answer.headers()['content-security-policy'], /script-src 'self' 'wasm-unsafe-eval'/);
      pages.push(page);
    }
    const [ann, ben] = pages;
    const tag = Date.now().toString(36);
    const annId = await register(ann, `ann${tag}`);
    const benId = await register(ben, `ben${tag}`);
    console.log(`registered ann (${annId}) and ben (${benId})`);

    const carol = start(join(root, 'target/debug/cim-client'),
      ['--route', `127.0.0.1:${port}`, '--user', `carol${tag}`],
      { CIM_PASSWORD: `carol${tag}-password`, XDG_DATA_HOME: join(tmp, 'carol'), RUST_LOG: 'warn' });
    await carol.line((l) => l.includes('online as'), '"online as"');

    // `all`, from each kind of client.
    await say(ann, 'hello from ann <b>not bold</b>');
    await sees(ben, 'all', ['hello from ann <b>not bold</b>']);
    await carol.line((l) => l.includes('hello from ann'), 'with ann\'s message');
    carol.type('hello from carol');
    await sees(ann, 'all', ['hello from ann <b>not bold</b>', 'hello from carol']);
    await sees(ben, 'all', ['hello from ann <b>not bold</b>', 'hello from carol']);
    assert.equal(await ben.$$eval('#msgs b', (b) => b.filter((e) => e.textContent === 'not bold').length), 0,
      'a message is shown as text, never as HTML');
    console.log('all: ok');

    // Privately, both ways: ann opens ben from the online list.
    const priv = `p:${[annId, benId].sort((a, b) => Number(a) - Number(b)).join(':')}`;
    await tap(ann, '#refresh');
    await ann.waitForSelector(`#online li[data-user="ben${tag}"]`, { timeout: WAIT });
    await tap(ann, `#online li[data-user="ben${tag}"]`);
    await say(ann, 'psst ben');
    await tap(ben, '#convs li[data-conv="all"]');
    await ben.waitForSelector(`#convs li[data-conv="${priv}"] .unread`, { timeout: WAIT });
    await sees(ben, priv, ['psst ben']);
    await say(ben, 'psst ann');
    await sees(ann, priv, ['psst ben', 'psst ann']);
    console.log('private: ok');

    // A group: ann creates it, ben joins, both write.
    const group = `g${tag}`;
    await ann.type('#group', group);
    await tap(ann, '#create');
    await ann.waitForSelector(`#convs li[data-conv="g:${group}"].current`, { timeout: WAIT });
    await ben.type('#group', group);
    await tap(ben, '#join');
    await ben.waitForSelector(`#convs li[data-conv="g:${group}"].current`, { timeout: WAIT });
    await say(ann, 'group hello');
    await sees(ben, `g:${group}`, ['group hello']);
    await say(ben, 'group reply');
    await sees(ann, `g:${group}`, ['group hello', 'group reply']);
    console.log('group: ok');
    if (screenshot) await ann.screenshot({ path: screenshot });

    // restart s1: the pages on it reconnect on their own; what is typed meanwhile arrives
    // once, in order.
    await tap(ann, '#convs li[data-conv="all"]');
    await tap(ben, '#convs li[data-conv="all"]');
    const onS1 = [];
    for (const page of pages) {
      const text = await page.$eval('#status', (e) => e.textContent);
      if (text.includes('server s1')) onS1.push([page, await page.evaluate(() => Number(document.body.dataset.reconnects ?? 0))]);
    }
    // The pages logged in one after the other, before carol: least-connections balancing
    // put them on different servers, so one is on s1.
    assert.ok(onS1.length > 0, 'a page is on s1, so the restart tests a reconnect');
    up.type('restart s1');
    const during = ['during 1', 'during 2', 'during 3'];
    for (const t of during) await say(ann, t);
    for (const t of during) await say(ben, `ben ${t}`);
    await up.line((l) => /s1.*(running|started)/i.test(l), 's1 running again');
    await sees(ben, 'all', during);
    await sees(ann, 'all', during.map((t) => `ben ${t}`));
    for (const page of pages) {
      await page.waitForFunction(() => document.querySelectorAll('#msgs li.sending').length === 0, { timeout: WAIT });
      assert.equal(await page.$$eval('#msgs li.unknown, #msgs li.rejected', (l) => l.length), 0);
    }
    for (const [page, before] of onS1) {
      assert.ok(await page.evaluate(() => Number(document.body.dataset.reconnects ?? 0)) > before,
        'the page on s1 reconnected by itself');
      await page.waitForSelector('#status.online', { timeout: WAIT });
    }
    for (const t of during) await carol.line((l) => l.includes(`"${t}"`), t);
    console.log('restart s1: ok');

    // A reload keeps an unsent message: with both servers stopped nothing can be sent.
    up.type('stop s1');
    up.type('stop s2');
    await ann.waitForFunction(() => !document.querySelector('#status.online'), { timeout: WAIT });
    await say(ann, 'typed before the reload');
    await ann.waitForSelector('#msgs li.sending', { timeout: WAIT });
    await ann.reload();
    await ann.waitForSelector('body[data-ready="1"]', { timeout: WAIT });
    // Resumed by the saved resumption secret: no password asked (it is never stored), the
    // unsent message still shown as sending.
    assert.equal(await ann.$eval('#login', (e) => e.hidden), true, 'no password asked');
    assert.ok(!(await ann.evaluate(() => JSON.stringify(localStorage))).includes(`ann${tag}-password`),
      'the password is not in storage');
    assert.equal(await ann.evaluate(() => JSON.parse(localStorage.getItem('cim.last')).userId), annId);
    await ann.waitForSelector('#msgs li.sending', { timeout: WAIT });
    up.type('start s1');
    up.type('start s2');
    await sees(ben, 'all', ['typed before the reload']);
    await ann.waitForFunction(() => document.querySelectorAll('#msgs li.sending').length === 0, { timeout: WAIT });
    const once = (await texts(ben, 'all')).filter((t) => t === 'typed before the reload').length;
    assert.equal(once, 1, 'delivered once');
    // The reloaded page shows what came before from the server's history.
    await sees(ann, 'all', ['hello from ann <b>not bold</b>', 'hello from carol', 'typed before the reload']);
    // Leaving a group takes it off the list.
    await tap(ben, `#convs li[data-conv="g:${group}"]`);
    await tap(ben, '#leave');
    await ben.waitForFunction((c) => !document.querySelector(`#convs li[data-conv="${c}"]`), { timeout: WAIT }, `g:${group}`);
    console.log('reload (resumed without the password), history, leave: ok');
    // Logging out ends the session at the route and forgets the secret: the next load asks
    // for the password.
    await tap(ann, '#logout');
    await ann.waitForFunction(() => !document.querySelector('#login').hidden, { timeout: WAIT });
    assert.equal(await ann.evaluate((id) => JSON.parse(localStorage.getItem(`cim.state.${id}`)).resumeSecret, annId),
      undefined, 'the secret is forgotten');
    await ann.reload();
    await ann.waitForSelector('body[data-ready="1"]', { timeout: WAIT });
    assert.equal(await ann.$eval('#login', (e) => e.hidden), false, 'the password is asked again');
    console.log('log out: ok');
  } finally {
    await browser.close();
  }
}

const guard = setTimeout(() => { console.error('browser test: over 5 minutes'); cleanup(); process.exit(1); }, 300_000);
main().then(() => {
  clearTimeout(guard);
  cleanup();
  console.log('browser test: passed');
}, (e) => {
  clearTimeout(guard);
  console.error(`browser test FAILED: ${e.stack ?? e}`);
  cleanup();
  process.exit(1);
});
