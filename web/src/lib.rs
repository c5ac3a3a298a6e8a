//! The browser's client: cim-core's [`ClientSession`] compiled to WebAssembly, so a web page
//! follows exactly the delivery rules of the Rust client (in-order exactly-once hand-off per
//! conversation, dedup by seq, gap fetch, sync on reconnect, outbox resent with the same ids
//! in order). Nothing here does I/O: the JavaScript shell (`web/js/shell.js`) does the
//! route's HTTP, the WebSocket, the timer and the storage, and drives [`WebClient`] exactly
//! as the tokio SDK (`cim_io::sdk`'s driver) drives the session: after every input, drain
//! [`WebClient::poll_output`] until it returns nothing, then arm one timer for
//! [`WebClient::poll_timeout`].
//!
//! The boundary is plain data: JSON strings one way (the route's answers, the saved state)
//! and the other (commands, events, the state to save), and protobuf frames as bytes. Time
//! comes in as milliseconds: `performance.now()` (monotonic, fractional) and `Date.now()`
//! (wall clock, for the outbox's age across a reload).

mod frames;
mod glue;

use cim_core::client::{ClientConfig, ClientSession, LoginAttempt};
use cim_core::ids::{ConvId, UnixMillis, UserId};
use cim_core::time::Instant;
use prost::Message;
use wasm_bindgen::prelude::*;

pub use frames::{frame_from_json, frame_to_json};
pub use glue::{GlueError, SavedState};

/// `performance.now()` in milliseconds to the core's instant, keeping the fraction: a
/// deadline half a millisecond away must be due when the shell's timer fires, not a
/// millisecond later (which would spin the timer).
fn instant(ms: f64) -> Instant {
    Instant::from_nanos((ms * 1e6).round() as i64)
}

fn wall(ms: f64) -> UnixMillis {
    UnixMillis(ms.max(0.0) as u64)
}

fn js_error(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// One output of the session: `kind()` is `"command"` or `"event"`, `json()` says what, and
/// `bytes()` holds the frame of a `transmit` command (empty otherwise).
#[wasm_bindgen]
#[derive(Debug)]
pub struct Output {
    kind: &'static str,
    json: String,
    bytes: Vec<u8>,
}

#[wasm_bindgen]
impl Output {
    pub fn kind(&self) -> String {
        self.kind.to_owned()
    }
    pub fn json(&self) -> String {
        self.json.clone()
    }
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.clone()
    }
}

/// One user's session. The password lives only in this object's memory (the session
/// needs it for every re-login); nothing it hands the shell to save contains it.
#[wasm_bindgen]
#[derive(Debug)]
pub struct WebClient {
    session: ClientSession,
    user: UserId,
}

#[wasm_bindgen]
impl WebClient {
    /// A session for `user_id` (decimal text: ids may exceed a JavaScript number's exact
    /// range). `seed` is 32 bytes from `crypto.getRandomValues` (message ids and resume
    /// tokens must never repeat across page loads). `saved` is what an earlier
    /// [`snapshot`](Self::snapshot) returned, or empty: its unsent messages are resent with
    /// their ids, in order, once online. Not started: call [`start`](Self::start).
    #[wasm_bindgen(constructor)]
    pub fn new(
        user_id: &str,
        name: &str,
        password: &str,
        seed: &[u8],
        saved: &str,
        now_ms: f64,
        wall_ms: f64,
    ) -> Result<WebClient, JsError> {
        let user = UserId(user_id.parse().map_err(|_| js_error("bad user id"))?);
        let seed: [u8; 32] = seed
            .try_into()
            .map_err(|_| js_error("the seed must be 32 bytes"))?;
        // The u64 seed is unused: `with_entropy` takes the 256 bits.
        let config = ClientConfig::new(user, name, password, 0);
        let session = if saved.is_empty() {
            ClientSession::with_entropy(config, seed)
        } else {
            let state = glue::parse_state(saved).map_err(js_error)?;
            ClientSession::restore_with_entropy(config, seed, state, instant(now_ms), wall(wall_ms))
        };
        Ok(WebClient { session, user })
    }

    pub fn start(&mut self, now_ms: f64) {
        self.session.start(instant(now_ms));
    }

    pub fn shutdown(&mut self, now_ms: f64) {
        self.session.shutdown(instant(now_ms));
    }

    /// Queues a text message to `conv` (`all`, `g:<name>`, `p:<low>:<high>`); returns its
    /// id (UUID text). Sent at once if online, otherwise when the session next is.
    pub fn send(&mut self, now_ms: f64, conv: &str, text: &str) -> Result<String, JsError> {
        let conv: ConvId = conv.parse().map_err(js_error)?;
        let id = self.session.send(
            instant(now_ms),
            conv,
            bytes::Bytes::copy_from_slice(text.as_bytes()),
        );
        Ok(id.to_string())
    }

    /// The route's answer to a `login` command: the HTTP status and body. A transport
    /// failure (no answer at all) is [`handle_login_failed`](Self::handle_login_failed).
    pub fn handle_login_answer(&mut self, now_ms: f64, attempt: f64, status: u16, body: &str) {
        let result = glue::login_answer(self.user, status, body);
        self.session
            .handle_login_answer(instant(now_ms), LoginAttempt(attempt as u64), result);
    }

    pub fn handle_login_failed(&mut self, now_ms: f64, attempt: f64, reason: &str) {
        self.session.handle_login_answer(
            instant(now_ms),
            LoginAttempt(attempt as u64),
            Err(cim_core::client::LoginFailure::Transport(reason.to_owned())),
        );
    }

    pub fn handle_connected(&mut self, now_ms: f64) {
        self.session.handle_connected(instant(now_ms));
    }

    pub fn handle_connect_failed(&mut self, now_ms: f64) {
        self.session.handle_connect_failed(instant(now_ms));
    }

    pub fn handle_disconnected(&mut self, now_ms: f64) {
        self.session.handle_disconnected(instant(now_ms));
    }

    /// One binary WebSocket message (one `cim.v1.Frame`). A message that is no frame, or a
    /// frame that makes no sense now, is ignored and said why; the session's state did not
    /// change.
    pub fn handle_frame(&mut self, now_ms: f64, bytes: &[u8]) -> Result<(), JsError> {
        let frame = cim_proto::Frame::decode(bytes).map_err(js_error)?;
        self.session
            .handle_frame(instant(now_ms), frame)
            .map_err(js_error)
    }

    pub fn handle_timeout(&mut self, now_ms: f64) {
        self.session.handle_timeout(instant(now_ms));
    }

    /// The next deadline in `performance.now()` milliseconds, or `undefined` for none.
    pub fn poll_timeout(&self) -> Option<f64> {
        self.session
            .poll_timeout()
            .map(|(at, _)| at.as_nanos() as f64 / 1e6)
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        let output = self.session.poll_output()?;
        let (kind, json, bytes) = glue::output(output);
        Some(Output { kind, json, bytes })
    }

    /// What to keep across a page load (JSON): the resume token, the unsent messages and
    /// each conversation's position. Never the password.
    pub fn snapshot(&self, now_ms: f64, wall_ms: f64) -> String {
        glue::state_json(&self.session.snapshot(instant(now_ms), wall(wall_ms)))
    }

    pub fn is_online(&self) -> bool {
        self.session.is_online()
    }

    pub fn outbox_len(&self) -> usize {
        self.session.outbox_len()
    }
}

/// The private conversation of two users (`p:<low>:<high>`), or an error for a user with
/// themself.
#[wasm_bindgen]
pub fn private_conv(a: &str, b: &str) -> Result<String, JsError> {
    let id = |s: &str| s.parse().map(UserId).map_err(|_| js_error("bad user id"));
    ConvId::private(id(a)?, id(b)?)
        .map(|c| c.to_string())
        .ok_or_else(|| js_error("a private conversation needs two different users"))
}

/// A group's conversation (`g:<name>`), or an error naming what is wrong with the name.
#[wasm_bindgen]
pub fn group_conv(name: &str) -> Result<String, JsError> {
    ConvId::group(name).map(|c| c.to_string()).map_err(js_error)
}
