// The web client's page: log in or register, then chat. The session (and its delivery
// rules) is the wasm WebClient driven by shell.js; this file only keeps what the page shows.
//
// Every string a user or the server supplied goes into the page as text (textContent, text
// nodes); nothing here assigns innerHTML.

import init, * as wasm from '../pkg/cim_web.js';
import { Shell, register, stateKey } from './shell.js';

const $ = (id) => document.getElementById(id);
const ACCOUNTS = 'cim.accounts'; // name (lower case) -> user id: not secret, saves typing

/** One element with text children only. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'onclick') node.addEventListener('click', v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const state = {
  shell: null,
  me: null, // {userId, name}
  current: 'all',
  convs: new Map(), // conv id -> {items: Map(msgId -> item), unread, title, oldestSeq, full}
  names: new Map([]), // user id -> name
  asking: new Set(),
};

function conv(id) {
  let c = state.convs.get(id);
  if (!c) {
    c = { items: new Map(), unread: 0, oldestSeq: null, full: false, order: 0 };
    state.convs.set(id, c);
  }
  return c;
}

function title(id) {
  if (id === 'all') return 'all';
  if (id.startsWith('g:')) return `#${id.slice(2)}`;
  const [, a, b] = id.split(':');
  const peer = a === state.me.userId ? b : a;
  return `@${state.names.get(peer) ?? peer}`;
}

function nameOf(userId) {
  const known = state.names.get(userId);
  if (known !== undefined) return known;
  lookUpNames([userId]);
  return `user ${userId}`;
}

async function lookUpNames(ids) {
  const wanted = ids.filter((id) => !state.names.has(id) && !state.asking.has(id));
  if (wanted.length === 0 || !state.shell?.token) return;
  wanted.forEach((id) => state.asking.add(id));
  try {
    const answer = await state.shell.api('POST', '/userNames', { userIds: wanted.map(Number) });
    for (const u of answer.users) state.names.set(String(u.userId), u.userName);
    render();
  } catch { /* shown as ids until the next try */ } finally {
    wanted.forEach((id) => state.asking.delete(id));
  }
}

// ---- session events ----

function onEvent(e) {
  switch (e.t) {
    case 'online': status(`online (server ${e.server})`, 'online'); refreshSide(); break;
    case 'loggingIn': status('logging in…', 'busy'); break;
    case 'connecting': status(`connecting to ${e.server}…`, 'busy'); break;
    case 'reconnecting':
      // Counted for the browser test, which checks that a restart made the page reconnect.
      document.body.dataset.reconnects = String(Number(document.body.dataset.reconnects ?? 0) + 1);
      status(`reconnecting in ${(e.delayMs / 1000).toFixed(1)} s (${e.cause})`, 'busy'); break;
    case 'stopped':
      status(`stopped: ${e.reason}`, 'down');
      // A reloaded page resumes by its saved secret; refused (used elsewhere, revoked,
      // expired), the session stops and the password is asked for, once.
      if (e.reason === 'PasswordNeeded') showLogin('Your saved session has ended: log in with your password.');
      break;
    case 'loginRejected': status(`login refused: ${e.reason}`, 'down'); showLogin(`Login refused: ${e.reason}`); break;
    case 'tlsFailed': status(`TLS with ${e.host} cannot work: ${e.reason}`, 'down'); break;
    case 'stateLost': flash(`unsent messages saved by an earlier visit could not be read (${e.reason})`); break;
    case 'kicked': status(`kicked: ${e.reason}`, 'busy'); break;
    case 'message': {
      const c = conv(e.conv);
      const mine = e.sender === state.me.userId;
      const had = c.items.get(e.msgId);
      c.items.set(e.msgId, { ...had, msgId: e.msgId, seq: e.seq, sender: e.sender, text: e.text, state: mine ? 'acked' : 'in' });
      if (!had && !mine && e.conv !== state.current) c.unread++;
      c.order = Date.now();
      break;
    }
    case 'acked': {
      const item = conv(e.conv).items.get(e.msgId);
      if (item) { item.state = 'acked'; item.seq = e.seq; }
      break;
    }
    case 'rejected': case 'unknown':
      for (const c of state.convs.values()) {
        const item = c.items.get(e.msgId);
        if (item) { item.state = e.t; item.reason = e.reason; }
      }
      break;
    case 'unavailable': case 'logReset':
      conv(e.conv).notice = e.t === 'logReset'
        ? 'the server lost this conversation\'s older messages'
        : `${e.count} messages were trimmed before you got them`;
      break;
    case 'logMoved': {
      // The server restarted and carried this conversation over. Nothing to do unless it
      // lost messages this page already showed: those are marked, and new ones follow.
      if (e.lost === 0) break;
      const c = conv(e.conv);
      for (const item of c.items.values()) {
        if (item.seq !== null && item.seq > e.continuesAfter) item.state = 'lost';
      }
      c.notice = `${e.lost} message${e.lost === 1 ? ' was' : 's were'} lost by the server`;
      break;
    }
  }
  render();
}

function status(text, cls) {
  const s = $('status');
  s.textContent = text;
  s.className = cls;
}

// ---- rendering ----

function render() {
  if (!state.me) return;
  const list = $('convs');
  list.replaceChildren();
  const ids = [...state.convs.keys()].sort((a, b) =>
    (a === 'all' ? -1 : b === 'all' ? 1 : a.localeCompare(b)));
  for (const id of ids) {
    const c = state.convs.get(id);
    const li = el('li', { 'data-conv': id, class: id === state.current ? 'current' : '', onclick: () => open(id) }, title(id));
    if (c.unread > 0) li.append(el('span', { class: 'unread', 'data-unread': String(c.unread) }, String(c.unread)));
    list.append(li);
  }
  const c = conv(state.current);
  $('title').textContent = title(state.current);
  $('leave').hidden = !state.current.startsWith('g:');
  $('notice').textContent = c.notice ?? '';
  $('older').hidden = c.full;
  const msgs = $('msgs');
  const atBottom = msgs.scrollTop + msgs.clientHeight >= msgs.scrollHeight - 4;
  msgs.replaceChildren();
  const items = [...c.items.values()];
  // Stored messages by seq; ours not yet stored after them, in the order sent.
  items.sort((a, b) => (a.seq ?? Infinity) - (b.seq ?? Infinity) || a.sentOrder - b.sentOrder);
  for (const m of items) {
    const label = { sending: '… sending', acked: '✓', unknown: '? unknown', rejected: `✗ ${m.reason ?? 'rejected'}`, in: '' }[m.state];
    msgs.append(el('li', { class: m.state, 'data-state': m.state, 'data-msg-id': m.msgId },
      el('b', {}, nameOf(m.sender)), ' ', el('span', { class: 'text' }, m.text), ' ', el('small', {}, label)));
  }
  if (atBottom) msgs.scrollTop = msgs.scrollHeight;
}

function open(id) {
  state.current = id;
  const c = conv(id);
  c.unread = 0;
  if (c.oldestSeq === null && !c.full) loadOlder();
  render();
  $('text').focus();
}

// ---- actions ----

let sentOrder = 0;

function sendTyped(ev) {
  ev.preventDefault();
  const text = $('text').value;
  if (!text.trim()) return;
  try {
    const id = state.shell.send(state.current, text);
    conv(state.current).items.set(id, { msgId: id, seq: null, sender: state.me.userId, text, state: 'sending', sentOrder: sentOrder++ });
    $('text').value = '';
  } catch (e) {
    flash(String(e.message ?? e));
  }
  render();
}

async function loadOlder() {
  const id = state.current;
  const c = conv(id);
  const before = c.oldestSeq ? `&beforeSeq=${c.oldestSeq}` : '';
  try {
    const h = await state.shell.api('GET', `/history?conv=${encodeURIComponent(id)}&limit=50${before}`);
    for (const m of h.messages) {
      if (!c.items.has(m.clientMsgId)) {
        const sender = String(m.senderId);
        c.items.set(m.clientMsgId, { msgId: m.clientMsgId, seq: m.seq, sender, text: m.msg, state: sender === state.me.userId ? 'acked' : 'in' });
      }
    }
    if (h.messages.length > 0) c.oldestSeq = h.messages[0].seq;
    c.full = h.messages.length === 0 || h.messages[0].seq <= h.firstAvailableSeq;
    lookUpNames([...new Set(h.messages.map((m) => String(m.senderId)))]);
  } catch (e) {
    if (state.shell.token) flash(`history: ${e.message}`);
  }
  render();
}

async function refreshSide() {
  try {
    const groups = (await state.shell.api('GET', '/group/list')).groups;
    for (const g of groups) conv(`g:${g}`);
    const online = await state.shell.api('GET', '/onlineUser');
    const list = $('online');
    list.replaceChildren();
    for (const u of online) {
      const id = String(u.userId);
      state.names.set(id, u.userName);
      const li = el('li', { 'data-user': u.userName }, u.userName);
      if (id !== state.me.userId) li.addEventListener('click', () => open(wasm.private_conv(state.me.userId, id)));
      list.append(li);
    }
    if (state.current && !state.convs.get(state.current).oldestSeq) loadOlder();
  } catch (e) {
    flash(String(e.message ?? e));
  }
  render();
}

async function groupAction(path) {
  const name = $('group').value.trim();
  try {
    const conv = wasm.group_conv(name);
    await state.shell.api('POST', path, { userId: Number(state.me.userId), groupName: name });
    $('group').value = '';
    await refreshSide();
    open(conv);
  } catch (e) {
    flash(String(e.message ?? e));
  }
}

async function leaveCurrent() {
  const name = state.current.slice(2);
  try {
    await state.shell.api('POST', '/group/leave', { userId: Number(state.me.userId), groupName: name });
    state.convs.delete(state.current);
    open('all');
  } catch (e) {
    flash(String(e.message ?? e));
  }
}

function flash(text) {
  $('flash').textContent = text;
}

// ---- login ----

const env = {
  wasm,
  WebSocket,
  fetch: (...a) => fetch(...a),
  storage: localStorage,
  now: () => performance.now(),
  wall: () => Date.now(),
  setTimeout: (f, ms) => setTimeout(f, ms),
  clearTimeout: (t) => clearTimeout(t),
  randomBytes: (n) => crypto.getRandomValues(new Uint8Array(n)),
  routeBase: '',
};

function accounts() {
  try { return JSON.parse(localStorage.getItem(ACCOUNTS) ?? '{}'); } catch { return {}; }
}

function showLogin(message) {
  $('login').hidden = false;
  $('chat').hidden = true;
  $('login-msg').textContent = message ?? '';
}

function pendingNote() {
  const id = $('uid').value.trim();
  let n = 0;
  try { n = JSON.parse(localStorage.getItem(stateKey(id)) ?? '{}').outbox?.length ?? 0; } catch { /* none */ }
  $('pending').textContent = n > 0 ? `${n} unsent message(s) will be sent once you log in.` : '';
}

/** Whether this browser holds a resumption secret for the user (then no password is needed). */
function canResume(userId) {
  try { return Boolean(JSON.parse(localStorage.getItem(stateKey(userId)) ?? '{}').resumeSecret); } catch { return false; }
}

/** Ends the session at the route (`/offLine` revokes the resumption secret) and forgets it here. */
async function logOut() {
  const shell = state.shell;
  if (!shell) return;
  try { await shell.api('POST', '/offLine', { userId: Number(state.me.userId) }); } catch { /* ended anyway below */ }
  shell.stop();
  state.shell = null;
  try {
    const saved = JSON.parse(localStorage.getItem(stateKey(state.me.userId)) ?? '{}');
    delete saved.resumeSecret;
    delete saved.resumeToken;
    localStorage.setItem(stateKey(state.me.userId), JSON.stringify(saved));
  } catch { localStorage.removeItem(stateKey(state.me.userId)); }
  showLogin('Logged out.');
}

function begin(userId, name, password) {
  if (state.shell) state.shell.stop();
  state.me = { userId, name };
  state.names.set(userId, name);
  state.shell = new Shell(env, { userId, name, password }, onEvent);
  // Messages this page typed before a reload: shown as sending until acknowledged.
  try {
    const saved = JSON.parse(localStorage.getItem(stateKey(userId)) ?? '{}');
    for (const m of saved.outbox ?? []) {
      conv(m.conv).items.set(m.id, { msgId: m.id, seq: null, sender: userId, text: m.text, state: 'sending', sentOrder: sentOrder++ });
    }
  } catch { /* the session reports a bad state itself */ }
  localStorage.setItem('cim.last', JSON.stringify({ userId, name }));
  const known = accounts();
  known[name.toLowerCase()] = userId;
  localStorage.setItem(ACCOUNTS, JSON.stringify(known));
  $('login').hidden = true;
  $('chat').hidden = false;
  conv('all');
  state.shell.start();
  render();
}

async function onLogin(ev) {
  ev.preventDefault();
  const name = $('name').value.trim();
  const password = $('password').value;
  let userId = $('uid').value.trim();
  try {
    if (ev.submitter?.id === 'register') {
      const made = await register(env, name, password);
      userId = String(made.userId);
    }
    if (!/^[0-9]+$/.test(userId)) throw new Error('give your user id (shown when you registered)');
    $('password').value = '';
    begin(userId, name, password);
  } catch (e) {
    $('login-msg').textContent = String(e.message ?? e);
  }
}

async function main() {
  await init();
  $('login-form').addEventListener('submit', onLogin);
  $('name').addEventListener('input', () => {
    const id = accounts()[$('name').value.trim().toLowerCase()];
    if (id) $('uid').value = id;
    pendingNote();
  });
  $('uid').addEventListener('input', pendingNote);
  $('send-form').addEventListener('submit', sendTyped);
  $('older').addEventListener('click', loadOlder);
  $('create').addEventListener('click', () => groupAction('/group/create'));
  $('join').addEventListener('click', () => groupAction('/group/join'));
  $('leave').addEventListener('click', leaveCurrent);
  $('refresh').addEventListener('click', refreshSide);
  $('logout').addEventListener('click', logOut);
  setInterval(() => { if (state.shell?.client.is_online()) refreshSide(); }, 15000);
  // The last user's name and id are remembered, never the password: a reload resumes by
  // the saved resumption secret, or asks for the password if there is none.
  window.addEventListener('beforeunload', () => state.shell?.save());
  const last = localStorage.getItem('cim.last');
  if (last) {
    const { name, userId } = JSON.parse(last);
    $('name').value = name;
    $('uid').value = userId;
    pendingNote();
    if (canResume(userId)) {
      begin(String(userId), name, '');
      document.body.dataset.ready = '1';
      return;
    }
  }
  showLogin();
  document.body.dataset.ready = '1';
}

main();
