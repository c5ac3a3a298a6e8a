// The browser shell around the wasm WebClient (cim-core's ClientSession): it does the
// route's HTTP, the WebSocket, the one timer and the storage, and drives the session as the
// tokio SDK's driver does (io/src/sdk/driver.rs): after every input, drain poll_output until
// it is empty, executing commands in order, then arm one timer for poll_timeout.
//
// Everything it touches comes in through `env`, so Node's test runner drives the same code
// with a fake WebSocket, fetch and clock (web/test/).

/** Where a user's state lives in storage (per origin already, so per route). */
export const stateKey = (userId) => `cim.state.${userId}`;

export class Shell {
  /**
   * @param {object} env
   *   wasm: the wasm-bindgen module (WebClient, ...), initialised
   *   WebSocket, fetch: the browser's (or a test's)
   *   storage: a localStorage-like {getItem, setItem, removeItem}
   *   now(): performance.now(); wall(): Date.now()
   *   setTimeout, clearTimeout
   *   randomBytes(n): Uint8Array of n random bytes (crypto.getRandomValues)
   *   routeBase: '' for the page's own origin (the route serves the page)
   * @param {{userId: string, name: string, password: string}} account
   * @param {(event: object) => void} onEvent every session event, parsed
   */
  constructor(env, account, onEvent) {
    this.env = env;
    this.account = account;
    this.onEvent = onEvent;
    this.token = null;
    this.ws = null;
    // Which WebSocket is current: reports from one the session gave up are dropped, as the
    // SDK's driver drops those of an old connection generation.
    this.generation = 0;
    this.lastLogin = null;
    this.timer = null;
    this.stopped = false;
    const saved = env.storage.getItem(stateKey(account.userId)) || '';
    const make = (state) => new env.wasm.WebClient(
      account.userId, account.name, account.password, env.randomBytes(32), state, env.now(), env.wall());
    try {
      this.client = make(saved);
    } catch (e) {
      if (!saved) throw e; // a bad user id: the caller's to show
      // Saved state this build cannot read (damaged, or written by a future version): start
      // afresh rather than never log in again, and say what was lost.
      this.client = make('');
      queueMicrotask(() => onEvent({ t: 'stateLost', reason: String(e.message ?? e) }));
    }
    // The password (empty on a reload, which resumes by the saved secret) is the session's
    // alone: the fallback when a resumption is refused, and never stored.
    this.account = { userId: account.userId, name: account.name };
  }

  start() {
    this.client.start(this.env.now());
    this.drain();
  }

  /** Queues a message; returns its id. Saved before this returns, so a reload keeps it. */
  send(conv, text) {
    const id = this.client.send(this.env.now(), conv, text);
    this.save();
    this.drain();
    return id;
  }

  /** Unsent messages and positions, as saved. */
  save() {
    this.env.storage.setItem(stateKey(this.account.userId),
      this.client.snapshot(this.env.now(), this.env.wall()));
  }

  stop() {
    this.stopped = true;
    this.client.shutdown(this.env.now());
    this.drain();
    this.save();
    if (this.timer !== null) this.env.clearTimeout(this.timer);
    this.timer = null;
  }

  drain() {
    let changed = false;
    for (let out = this.client.poll_output(); out; out = this.client.poll_output()) {
      const what = JSON.parse(out.json());
      if (out.kind() === 'command') {
        this.execute(what, out);
      } else {
        changed = true;
        this.onEvent(what);
      }
      out.free();
    }
    // Events move positions and the outbox (acked, delivered): keep the saved copy current.
    if (changed) this.save();
    this.arm();
  }

  arm() {
    if (this.timer !== null) this.env.clearTimeout(this.timer);
    this.timer = null;
    if (this.stopped) return;
    const at = this.client.poll_timeout();
    if (at === undefined) return;
    const delay = Math.max(0, at - this.env.now());
    this.timer = this.env.setTimeout(() => {
      this.timer = null;
      this.client.handle_timeout(this.env.now());
      this.drain();
    }, delay);
  }

  execute(cmd, out) {
    switch (cmd.t) {
      case 'login': return this.login(cmd.attempt, cmd.body);
      case 'connect': return this.connect(cmd.url);
      case 'transmit':
        if (this.ws && this.ws.readyState === 1) this.ws.send(out.bytes());
        return;
      case 'disconnect': return this.disconnect();
    }
  }

  async login(attempt, body) {
    this.lastLogin = attempt;
    let status, text;
    try {
      const answer = await this.env.fetch(`${this.env.routeBase}/login`, {
        method: 'POST', headers: { 'content-type': 'application/json' }, body,
      });
      status = answer.status;
      text = await answer.text();
    } catch (e) {
      if (this.stopped) return;
      this.client.handle_login_failed(this.env.now(), attempt, String(e));
      this.drain();
      return;
    }
    if (this.stopped) return;
    if (attempt === this.lastLogin) {
      // The bearer token for the HTTP API (groups, online users, history).
      try {
        const token = JSON.parse(text)?.dataBody?.token;
        if (token) this.token = token;
      } catch { /* the session reports a bad answer itself */ }
    }
    this.client.handle_login_answer(this.env.now(), attempt, status, text);
    this.drain();
  }

  connect(url) {
    this.disconnect();
    const generation = ++this.generation;
    if (!url) {
      // The server has no WebSocket port: nothing a browser can reach. The session backs
      // off and logs in again (perhaps to another server).
      queueMicrotask(() => this.report(generation, (now) => this.client.handle_connect_failed(now)));
      return;
    }
    let ws;
    try {
      ws = new this.env.WebSocket(url);
    } catch {
      queueMicrotask(() => this.report(generation, (now) => this.client.handle_connect_failed(now)));
      return;
    }
    ws.binaryType = 'arraybuffer';
    let open = false;
    ws.onopen = () => {
      open = true;
      this.report(generation, (now) => this.client.handle_connected(now));
    };
    ws.onmessage = (m) => {
      if (!(m.data instanceof ArrayBuffer)) return; // the protocol is binary only
      this.report(generation, (now) => {
        try {
          this.client.handle_frame(now, new Uint8Array(m.data));
        } catch (e) {
          console.debug('frame ignored:', e);
        }
      });
    };
    ws.onclose = () => {
      this.report(generation, (now) => (open
        ? this.client.handle_disconnected(now)
        : this.client.handle_connect_failed(now)));
      if (this.generation === generation) this.ws = null;
    };
    this.ws = ws;
  }

  /** Feeds an input about connection `generation`, unless the session gave it up. */
  report(generation, input) {
    if (this.stopped || generation !== this.generation) return;
    input(this.env.now());
    this.drain();
  }

  disconnect() {
    this.generation++;
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      try { ws.close(1000); } catch { /* already closed */ }
    }
  }

  /** The route's HTTP API with this session's bearer token; throws on a non-9000 answer. */
  async api(method, path, body) {
    if (!this.token) throw new Error('not logged in yet');
    const init = { method, headers: { authorization: `Bearer ${this.token}` } };
    if (body !== undefined) {
      init.headers['content-type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const answer = await this.env.fetch(`${this.env.routeBase}${path}`, init);
    const envelope = await answer.json();
    if (envelope.code !== '9000') throw new Error(envelope.message || `code ${envelope.code}`);
    return envelope.dataBody;
  }
}

/** `POST /registerAccount`: {userId, userName}, or throws with the route's message. */
export async function register(env, name, password) {
  const answer = await env.fetch(`${env.routeBase}/registerAccount`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ userName: name, password }),
  });
  const envelope = await answer.json();
  if (envelope.code !== '9000') throw new Error(envelope.message || `code ${envelope.code}`);
  return envelope.dataBody;
}
