// The browser shell (js/shell.js) driving the wasm session (the very build web/build makes,
// from pkg/), against a fake route and a fake WebSocket server on a virtual clock: the
// delivery rules as a page sees them. `node --test web/test/` (after web/build).

import test from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import init, * as wasm from '../pkg/cim_web.js';
import { Shell, stateKey } from '../js/shell.js';

await init({ module_or_path: readFileSync(new URL('../pkg/cim_web_bg.wasm', import.meta.url)) });

const ME = '7';
const RESUME = Buffer.alloc(32, 9).toString('base64url');
const SECRET = Buffer.alloc(32, 5).toString('base64url');

/** A fake world: clock and timers, storage, the route's /login, WebSockets. */
function world() {
  const w = {
    t: 1000,
    timers: new Map(),
    nextTimer: 1,
    store: new Map(),
    logins: [], // bodies of POST /login, parsed
    sockets: [],
    events: [],
    refuseResumption: false, // the fake route answers a resumption 9110 (refused)
  };
  w.env = {
    wasm,
    now: () => w.t,
    wall: () => 1_700_000_000_000 + w.t,
    setTimeout: (f, ms) => { const id = w.nextTimer++; w.timers.set(id, { at: w.t + ms, f }); return id; },
    clearTimeout: (id) => w.timers.delete(id),
    randomBytes: (n) => Uint8Array.from({ length: n }, () => Math.floor(Math.random() * 256)),
    storage: {
      getItem: (k) => (w.store.has(k) ? w.store.get(k) : null),
      setItem: (k, v) => w.store.set(k, String(v)),
      removeItem: (k) => w.store.delete(k),
    },
    routeBase: 'http://route',
    fetch: async (url, init) => {
      assert.equal(url, 'http://route/login');
      w.logins.push(JSON.parse(init.body));
      if (w.refuseResumption && w.logins.at(-1).resumeSecret) {
        const refused = JSON.stringify({ code: '9110', message: 'resumption refused' });
        return { status: 200, text: async () => refused };
      }
      const body = JSON.stringify({ code: '9000', message: 'success', dataBody: {
        userId: 7, epoch: w.logins.length, serverId: 's1',
        endpoint: { host: 'h', port: 1, tls: false, wsUrl: 'ws://h:11411/' },
        ip: 'h', cimServerPort: 1, httpPort: 2, ticket: '', token: `tok${w.logins.length}`,
        resumeToken: RESUME, resumeSecret: SECRET,
      } });
      return { status: 200, text: async () => body };
    },
    WebSocket: class {
      constructor(url) {
        this.url = url;
        this.readyState = 0;
        this.sent = [];
        w.sockets.push(this);
      }
      send(bytes) { this.sent.push(JSON.parse(wasm.frame_to_json(bytes))); }
      close() { this.readyState = 3; }
      // The server's side:
      open() { this.readyState = 1; this.onopen?.(); }
      push(frame) { this.onmessage?.({ data: wasm.frame_from_json(JSON.stringify(frame)).slice().buffer }); }
      drop() { this.readyState = 3; this.onclose?.({ code: 1006 }); }
      sends() { return this.sent.filter((f) => f.t === 'send'); }
    },
  };
  w.shell = (password = 'pw') => new Shell(w.env, { userId: ME, name: 'ann', password }, (e) => w.events.push(e));
  /** Runs timers due within `ms`, in order, moving the clock to each. */
  w.advance = async (ms) => {
    const end = w.t + ms;
    for (;;) {
      await settle();
      const due = [...w.timers.entries()].filter(([, x]) => x.at <= end).sort((a, b) => a[1].at - b[1].at)[0];
      if (!due) break;
      w.timers.delete(due[0]);
      w.t = Math.max(w.t, due[1].at);
      due[1].f();
    }
    w.t = end;
    await settle();
  };
  w.socket = () => w.sockets[w.sockets.length - 1];
  /** Logs in through the fake route and answers the server's side until online. */
  w.online = async (shell, heads = [{ conv: 'all', logEpoch: '5', headSeq: 0, firstAvailableSeq: 1, cursorSeq: 0 }]) => {
    const before = w.sockets.length;
    for (let i = 0; i < 100 && w.sockets.length === before; i++) await w.advance(100);
    const ws = w.socket();
    assert.equal(ws.url, 'ws://h:11411/', 'connects to the login answer\'s wsUrl');
    ws.open();
    assert.equal(ws.sent[0].t, 'login');
    ws.push({ t: 'loginOk', user: ME, epoch: String(w.logins.length), server: 's1', heartbeatMs: 10000 });
    assert.ok(shell.client.is_online());
    assert.ok(ws.sent.some((f) => f.t === 'syncRequest'));
    ws.push({ t: 'syncAnswer', heads });
    await settle();
    return ws;
  };
  w.messages = (conv) => w.events.filter((e) => e.t === 'message' && (!conv || e.conv === conv));
  return w;
}

async function settle() {
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
}

const msg = (seq, text, extra = {}) => ({
  t: 'deliver', conv: 'all', logEpoch: '5', seq, sender: '8',
  msgId: `00000000-0000-0000-0000-${String(seq).padStart(12, '0')}`, text, ...extra,
});

test('messages typed before a reload are resent after it with the same ids, in order, and never the password is stored', async () => {
  const w = world();
  const first = w.shell();
  first.start();
  const ids = ['one', 'two', 'three'].map((text) => first.send('all', text));
  const saved = w.store.get(stateKey(ME));
  assert.equal(JSON.parse(saved).outbox.length, 3, 'saved at once');
  assert.ok(!saved.includes('pw'), 'no password in storage');
  first.stop(); // the page goes away before any connection came up

  const second = w.shell(); // the reload: a new seed, the saved state
  second.start();
  const ws = await w.online(second);
  assert.deepEqual(ws.sends().map((s) => [s.msgId, s.text]), [[ids[0], 'one'], [ids[1], 'two'], [ids[2], 'three']]);
  ws.sends().forEach((s, i) => ws.push({ t: 'sendAck', msgId: s.msgId, conv: 'all', logEpoch: '5', seq: i + 1 }));
  assert.deepEqual(w.events.filter((e) => e.t === 'acked').map((e) => e.msgId), ids);
  assert.equal(JSON.parse(w.store.get(stateKey(ME))).outbox.length, 0, 'acknowledged ones are no longer kept');
});

test('a message pushed twice is handed over once', async () => {
  const w = world();
  const shell = w.shell();
  shell.start();
  const ws = await w.online(shell);
  ws.push(msg(1, 'a'));
  ws.push(msg(1, 'a'));
  ws.push(msg(2, 'b'));
  ws.push(msg(1, 'a'));
  assert.deepEqual(w.messages().map((m) => [m.seq, m.text]), [[1, 'a'], [2, 'b']]);
});

test('a gap is fetched after the gap delay and filled in order', async () => {
  const w = world();
  const shell = w.shell();
  shell.start();
  const ws = await w.online(shell);
  ws.push(msg(1, 'a'));
  ws.push(msg(4, 'd')); // 2 and 3 lost
  assert.deepEqual(w.messages().map((m) => m.seq), [1]);
  assert.ok(!ws.sent.some((f) => f.t === 'fetchRequest'), 'not at once: a late push may still come');
  await w.advance(400);
  const fetch = ws.sent.find((f) => f.t === 'fetchRequest');
  assert.ok(fetch, 'fetched after the gap delay');
  assert.equal(fetch.afterSeq, 1);
  ws.push({ t: 'fetchAnswer', head: { conv: 'all', logEpoch: '5', headSeq: 4, firstAvailableSeq: 1, cursorSeq: 1 },
    messages: [msg(2, 'b'), msg(3, 'c'), msg(4, 'd')] });
  assert.deepEqual(w.messages().map((m) => [m.seq, m.text]), [[1, 'a'], [2, 'b'], [3, 'c'], [4, 'd']]);
  // Acknowledged to the server: the cursor moved to 4.
  await w.advance(500);
  const acks = ws.sent.filter((f) => f.t === 'deliverAck').flatMap((f) => f.cursors);
  assert.equal(acks.at(-1).seq, 4);
});

test('a log moved by a store restart continues where the page was, and reports only what was lost', async () => {
  const w = world();
  const shell = w.shell();
  shell.start();
  const ws = await w.online(shell);
  [1, 2, 3].forEach((seq) => ws.push(msg(seq, String(seq))));
  // The store restarted and lost 3: the next message comes under a new log epoch.
  ws.push(msg(3, 'x', { logEpoch: '6' }));
  const fetch = ws.sent.findLast((f) => f.t === 'fetchRequest');
  assert.equal(fetch.logEpoch, '5');
  const head = { conv: 'all', logEpoch: '6', headSeq: 3, firstAvailableSeq: 1, cursorSeq: 0, carriedFromEpoch: '5', carriedUpTo: 2 };
  ws.push({ t: 'fetchAnswer', head, messages: [] });
  assert.deepEqual(w.events.filter((e) => e.t === 'logMoved'), [{ t: 'logMoved', conv: 'all', continuesAfter: 2, lost: 1 }]);
  ws.push({ t: 'fetchAnswer', head, messages: [msg(3, 'x', { logEpoch: '6' })] });
  // Nothing handed over twice: 1 and 2 were carried over, 3 is the new message.
  assert.deepEqual(w.messages().map((m) => [m.logEpoch, m.seq, m.text]), [['5', 1, '1'], ['5', 2, '2'], ['5', 3, '3'], ['6', 3, 'x']]);
  assert.equal(w.events.filter((e) => e.t === 'logReset').length, 0);
});

test('a lost connection reconnects with the resume token and resends what was unacknowledged and typed meanwhile, once, in order', async () => {
  const w = world();
  const shell = w.shell();
  shell.start();
  const ws1 = await w.online(shell);
  const own = w.logins[0].resumeToken; // the session's own, before any answer
  const a = shell.send('all', 'before the cut');
  assert.deepEqual(ws1.sends().map((s) => s.msgId), [a]);
  ws1.drop();
  assert.ok(w.events.some((e) => e.t === 'reconnecting'));
  const b = shell.send('all', 'typed while down');
  const c = shell.send('all', 'and another');
  const ws2 = await w.online(shell);
  assert.notEqual(ws2, ws1);
  assert.equal(w.logins.length, 2);
  assert.notEqual(own, RESUME);
  assert.equal(w.logins[1].resumeToken, RESUME, 'the re-login carries the login answer\'s resume token');
  assert.equal(w.logins[1].resumeSecret, SECRET, 'and the resumption secret it issued');
  assert.equal(w.logins[1].password, undefined, 'a resumption sends no password');
  assert.deepEqual(ws2.sends().map((s) => s.msgId), [a, b, c]);
  // Frames from the old socket are no longer this session's business.
  ws1.push(msg(1, 'stale'));
  assert.equal(w.messages().length, 0);
});

test('a server silent past the heartbeat timeout is given up and logged into again', async () => {
  const w = world();
  const shell = w.shell();
  shell.start();
  const ws1 = await w.online(shell);
  await w.advance(10_000 + 5_000 + 100); // a ping, then no pong
  assert.ok(ws1.sent.some((f) => f.t === 'ping'));
  assert.equal(ws1.readyState, 3, 'closed by the shell');
  const lost = w.events.find((e) => e.t === 'reconnecting');
  assert.match(lost.cause, /stopped answering/);
  await w.online(shell);
  assert.ok(w.logins.length >= 2);
  assert.equal(w.logins.at(-1).resumeToken, RESUME);
});

test('saved state that cannot be read is dropped with an event, and the session still logs in', async () => {
  const w = world();
  w.store.set(stateKey(ME), '{"outbox": [{"id": "not-an-id"');
  const shell = w.shell();
  shell.start();
  await settle();
  const lost = w.events.find((e) => e.t === 'stateLost');
  assert.ok(lost, 'said so');
  assert.match(lost.reason, /not valid JSON/);
  await w.online(shell);
  assert.equal(JSON.parse(w.store.get(stateKey(ME))).outbox.length, 0, 'replaced by a readable state');
});

test('a reload resumes by the saved secret without the password; a refused one asks for it', async () => {
  const w = world();
  const first = w.shell();
  first.start();
  await w.online(first);
  assert.equal(w.logins[0].password, 'pw', 'the first login is by password');
  const saved = w.store.get(stateKey(ME));
  assert.equal(JSON.parse(saved).resumeSecret, SECRET, 'the secret is saved');
  assert.ok(!saved.includes('"pw"'), 'the password is not');
  first.stop();

  const reloaded = w.shell(''); // a reloaded page: no password typed
  reloaded.start();
  await w.online(reloaded);
  assert.equal(w.logins[1].resumeSecret, SECRET, 'resumes by the secret');
  assert.equal(w.logins[1].password, undefined, 'sends no password');
  reloaded.stop();

  w.refuseResumption = true; // used elsewhere, revoked or expired
  const refused = w.shell('');
  refused.start();
  await w.advance(2000);
  assert.equal(w.logins.length, 3, 'one attempt, no retry loop');
  assert.ok(w.events.some((e) => e.t === 'stopped' && e.reason === 'PasswordNeeded'), 'asks for the password');
});
