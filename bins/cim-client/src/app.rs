//! The chat session both modes share: runs commands, turns SDK events into output, keeps
//! the state file and the local history up to date.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cim_core::client::ClientState;
use cim_core::client::{
    ClientConfig, ClientEvent, ConnectionLoss, ErrorCode, KickReason, LoginFailure, StopReason,
};
use cim_core::ids::{ClientMsgId, ConvId, UserId};
use cim_core::route::login::LoginError;
use cim_io::api::OnlineUser;
use cim_io::clock::Clock;
use cim_io::net::TokioNet;
use cim_io::sdk::{self, ApiError, Client, Events, RouteApi, SdkOptions, SdkTls};
use tokio::sync::mpsc;

use crate::client_file::{self, ClientFile, LocalHistory, PendingDelay, SeenMessage};
use crate::command::{self, Command, ParseError, Target};
use crate::exit::Failure;
use crate::render::{Level, Sink};

/// Names for tab completion, shared with the line editor's thread.
#[derive(Debug, Default)]
pub struct Completions {
    pub users: Vec<String>,
    pub groups: Vec<String>,
}

pub type SharedCompletions = Arc<Mutex<Completions>>;

/// The online list is refreshed at most this often, and a failed name lookup is retried no
/// sooner than this.
const REFRESH_MIN_GAP: Duration = Duration::from_secs(2);
/// Read positions advance with every message; they are saved this often (and on every
/// send, acknowledgement and exit), so a crash re-delivers at most a few seconds' worth.
pub const SAVE_EVERY: Duration = Duration::from_secs(5);
/// Messages shown by `:q`.
const SEARCH_LIMIT: usize = 20;
/// Longest message body handed to the session: well inside the 64 KiB frame limit.
const LOCAL_BODY_LIMIT: usize = 60 * 1024;

#[derive(Debug)]
pub struct App {
    client: Client<TokioNet>,
    host: String,
    port: u16,
    tls: Option<SdkTls>,
    password: String,
    may_reregister: bool,
    api: RouteApi<TokioNet>,
    me: UserId,
    route: String,
    path: PathBuf,
    file: ClientFile,
    history: LocalHistory,
    pub sink: Sink,
    completions: SharedCompletions,
    /// Where `:delay`ed messages come back (by id) to be sent.
    delayed: mpsc::UnboundedSender<u64>,
    /// The next `:delay` id.
    next_delay: u64,
    /// Delays the non-interactive mode waits for before it exits.
    awaited_delays: BTreeSet<u64>,
    server: Option<(String, u64)>,
    was_online: bool,
    reconnecting: bool,
    /// Own messages not yet acknowledged: id → conversation label.
    sending: BTreeMap<ClientMsgId, String>,
    /// Own acknowledged messages whose echo has not come back yet (not shown twice).
    echo_pending: BTreeSet<ClientMsgId>,
    last_refresh: Option<cim_core::time::Instant>,
    /// Ids the route was asked to name and had no account for: not asked again this run.
    looked_up: BTreeSet<u64>,
    /// When a name lookup last failed: lookups pause for `REFRESH_MIN_GAP` after it, so a
    /// route that is down is not asked once per message.
    names_failed_at: Option<cim_core::time::Instant>,
    pub stopped: Option<StopReason>,
    /// The first failure of this run: the exit code (see `exit`).
    pub failure: Option<Failure>,
    /// Messages this run queued that are not acknowledged, rejected or expired yet.
    this_run: BTreeSet<ClientMsgId>,
    /// The login was refused for good (wrong password, untrusted certificate): this run's
    /// unacknowledged messages are not kept for a later run, which would send them under a
    /// login the user did not see succeed.
    drop_unsent: bool,
    /// The first login was answered "repeat login": another client without this state
    /// file holds the session.
    pub blocked_elsewhere: bool,
    verbose: bool,
}

pub struct AppParts {
    pub client: Client<TokioNet>,
    /// Where and how to start a session again (after registering anew).
    pub host: String,
    pub port: u16,
    pub tls: Option<SdkTls>,
    pub password: String,
    /// The id came from the state file: if the route no longer knows it (a store that
    /// was reset), registering the name again is allowed once.
    pub may_reregister: bool,
    pub me: UserId,
    pub route: String,
    pub path: PathBuf,
    pub file: ClientFile,
    pub sink: Sink,
    pub completions: SharedCompletions,
    pub delayed: mpsc::UnboundedSender<u64>,
    /// Protocol details in messages (`--verbose`).
    pub verbose: bool,
}

impl App {
    pub fn new(parts: AppParts) -> Self {
        let history = LocalHistory::load(
            client_file::sibling(&parts.path, "history.jsonl"),
            client_file::HISTORY_CAP,
        );
        let api = parts.client.route_api();
        let next_delay = parts
            .file
            .delayed
            .iter()
            .map(|d| d.id + 1)
            .max()
            .unwrap_or(1);
        let app = Self {
            client: parts.client,
            host: parts.host,
            port: parts.port,
            tls: parts.tls,
            password: parts.password,
            may_reregister: parts.may_reregister,
            api,
            me: parts.me,
            route: parts.route,
            path: parts.path,
            file: parts.file,
            history,
            sink: parts.sink,
            completions: parts.completions,
            delayed: parts.delayed,
            next_delay,
            awaited_delays: BTreeSet::new(),
            server: None,
            was_online: false,
            reconnecting: false,
            sending: BTreeMap::new(),
            echo_pending: BTreeSet::new(),
            last_refresh: None,
            looked_up: BTreeSet::new(),
            names_failed_at: None,
            stopped: None,
            failure: None,
            this_run: BTreeSet::new(),
            drop_unsent: false,
            blocked_elsewhere: false,
            verbose: parts.verbose,
        };
        app.publish_users();
        app
    }

    /// Records a failure; the first one of a run is its exit code.
    pub fn fail(&mut self, failure: Failure) {
        self.failure.get_or_insert(failure);
    }

    /// Whether a session is up now.
    pub fn is_online(&self) -> bool {
        self.was_online && !self.reconnecting && self.stopped.is_none()
    }

    /// Whether this run has been online at all.
    pub fn was_online(&self) -> bool {
        self.was_online
    }

    /// Reports an error and records its failure.
    fn error(&mut self, failure: Failure, text: &str) {
        self.fail(failure);
        self.sink.error(text);
    }

    /// A route API error in words; the codes only with `--verbose`.
    fn api_error(&mut self, error: &ApiError) {
        let (failure, text) = match error {
            ApiError::Status {
                http,
                code,
                message,
            } => {
                let text = if self.verbose {
                    format!("{message} (HTTP {http}, code {code})")
                } else {
                    message.clone()
                };
                (Failure::BadLine, text)
            }
            ApiError::Transport(e) if self.verbose => (
                Failure::Unreachable,
                format!("the route did not answer: {e}"),
            ),
            ApiError::Transport(_) => (
                Failure::Unreachable,
                "the route did not answer; try again in a moment (--verbose for details)"
                    .to_owned(),
            ),
            ApiError::BadBody(e) => (
                Failure::Other,
                format!("the route's answer made no sense: {e}"),
            ),
        };
        self.error(failure, &text);
    }

    /// Runs one typed line. `false` when the user asked to quit.
    pub async fn on_line(&mut self, line: &str) -> bool {
        let command = match command::parse(line) {
            Ok(command) => command,
            Err(error @ ParseError::Unknown(_)) => {
                // Never sent: a mistyped command must not leak into a conversation.
                self.error(Failure::BadLine, &format!("{error} (not sent)"));
                self.sink
                    .result("help", serde_json::Value::Null, &command::help());
                return true;
            }
            Err(error) => {
                self.error(Failure::BadLine, &error.to_string());
                return true;
            }
        };
        match command {
            Command::Nothing => {}
            Command::Quit => return false,
            Command::Help => {
                let help = command::help();
                self.sink.result("help", serde_json::json!(help), &help);
            }
            Command::Say(target, text) => self.say(target, text).await,
            Command::Delay(after, target, text) => {
                let pending = PendingDelay {
                    id: self.next_delay,
                    due_at_ms: Clock::System
                        .wall()
                        .0
                        .saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX)),
                    line: target.line(&text),
                };
                self.next_delay += 1;
                self.awaited_delays.insert(pending.id);
                self.schedule(&pending);
                self.file.delayed.push(pending);
                // On disk before it is confirmed: a quit or a crash does not lose it.
                self.save().await;
                self.sink.status(
                    Level::Quiet,
                    &format!("· will send in {}s", after.as_secs()),
                );
            }
            Command::Online => self.show_online(None).await,
            Command::OnlinePrefix(prefix) => self.show_online(Some(prefix)).await,
            Command::Info => self.show_info().await,
            Command::Search(keyword) => {
                let found = self.history.search(&keyword, SEARCH_LIMIT);
                let mut text = format!("{} match(es) for {keyword:?}", found.len());
                for m in &found {
                    text.push_str(&format!("\n  {}", self.plain(m)));
                }
                self.sink
                    .result("q", serde_json::to_value(&found).unwrap_or_default(), &text);
            }
            Command::History(of, count) => self.show_history(of, count).await,
            Command::Join(group) => self.group_call("join", group).await,
            Command::Leave(group) => self.group_call("leave", group).await,
            Command::Create(group) => self.group_call("create", group).await,
            Command::Groups => {
                let Some(token) = self.token() else {
                    return true;
                };
                match self.api.list_groups(&token).await {
                    Ok(groups) => {
                        self.completions
                            .lock()
                            .map(|mut c| c.groups = groups.clone())
                            .ok();
                        let text = if groups.is_empty() {
                            "groups: (only all)".to_owned()
                        } else {
                            format!("groups: all, {}", groups.join(", "))
                        };
                        self.sink.result("groups", serde_json::json!(groups), &text);
                    }
                    Err(error) => self.api_error(&error),
                }
            }
        }
        true
    }

    /// Arms the timer of one pending delay; its id comes back on the `delayed` channel.
    fn schedule(&self, pending: &PendingDelay) {
        let left = Duration::from_millis(pending.due_at_ms.saturating_sub(Clock::System.wall().0));
        let (delayed, id) = (self.delayed.clone(), pending.id);
        tokio::spawn(async move {
            Clock::System.sleep_until(Clock::System.now() + left).await;
            let _ = delayed.send(id);
        });
    }

    /// Schedules the delays a previous run left (overdue ones fire at once). Those due
    /// within `await_within` are waited for by the non-interactive mode.
    pub fn restore_delays(&mut self, await_within: Duration) {
        let pending = self.file.delayed.clone();
        if pending.is_empty() {
            return;
        }
        let horizon = Clock::System
            .wall()
            .0
            .saturating_add(u64::try_from(await_within.as_millis()).unwrap_or(u64::MAX));
        for delay in &pending {
            self.schedule(delay);
            if delay.due_at_ms <= horizon {
                self.awaited_delays.insert(delay.id);
            }
        }
        self.sink.status(
            Level::Info,
            &format!(
                "* {} delayed message(s) from the last run: sent at their time",
                pending.len()
            ),
        );
    }

    /// A delay's time has come: send it (it leaves the pending list in the same save that
    /// puts it in the outbox).
    pub async fn fire_delay(&mut self, id: u64) {
        self.awaited_delays.remove(&id);
        let Some(at) = self.file.delayed.iter().position(|d| d.id == id) else {
            return;
        };
        let pending = self.file.delayed.remove(at);
        match command::parse(&pending.line) {
            Ok(Command::Say(target, text)) => self.say(target, text).await,
            _ => self.sink.error(&format!(
                "delayed message {:?} is not a message; dropped",
                pending.line
            )),
        }
        self.save().await;
    }

    /// Delays this run still waits for (non-interactive mode).
    pub fn awaiting_delays(&self) -> usize {
        self.awaited_delays.len()
    }

    /// Delays not sent yet, kept in the state file for the next run.
    pub fn pending_delays(&self) -> usize {
        self.file.delayed.len()
    }

    /// Sends a message; its fate is reported as events come.
    pub async fn say(&mut self, target: Target, text: String) {
        // Past the frame limit the connection itself would fail; the server's own (smaller)
        // body limit answers with a rejection.
        if text.len() > LOCAL_BODY_LIMIT {
            return self.error(
                Failure::TooLong,
                &format!(
                    "message too long ({} bytes; at most {LOCAL_BODY_LIMIT}, and servers usually take 4096) (not sent)",
                    text.len()
                ),
            );
        }
        let conv = match self.resolve(&target).await {
            Ok(conv) => conv,
            Err((failure, error)) => {
                self.error(failure, &format!("{error} (not sent)"));
                return;
            }
        };
        let label = self.label(&conv);
        match self.client.submit(conv, text.into_bytes().into()).await {
            Ok(id) => {
                self.this_run.insert(id);
                self.sending.insert(id, label.clone());
                let detail = if self.verbose {
                    format!(" ({})", short(id))
                } else {
                    String::new()
                };
                self.sink
                    .status(Level::Quiet, &format!("· sending to {label}{detail}"));
                // The outbox is on disk before the user sees "sending": a crash now resends it.
                self.save().await;
            }
            Err(_) => self.error(
                Failure::Other,
                "not sent: the session has ended (quit and start again)",
            ),
        }
    }

    async fn resolve(&mut self, target: &Target) -> Result<ConvId, (Failure, String)> {
        let yourself = || (Failure::BadLine, "that is you".to_owned());
        match target {
            Target::All => Ok(ConvId::All),
            Target::Group(name) => {
                ConvId::group(name).map_err(|e| (Failure::BadLine, e.to_string()))
            }
            Target::UserId(id) => ConvId::private(self.me, UserId(*id)).ok_or_else(yourself),
            Target::UserName(name) => {
                let id = match self.id_of(name) {
                    Some(id) => id,
                    None => {
                        let _ = self.refresh_online(true).await;
                        self.id_of(name).ok_or_else(|| {
                            (
                                Failure::UnknownRecipient,
                                format!(
                                    "no user {name} is online or known here (if you know the id, @<id> reaches them offline)"
                                ),
                            )
                        })?
                    }
                };
                ConvId::private(self.me, UserId(id)).ok_or_else(yourself)
            }
        }
    }

    fn id_of(&self, name: &str) -> Option<u64> {
        self.file
            .users
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(id, _)| *id)
    }

    fn name_of(&self, id: UserId) -> Option<String> {
        if id == self.me {
            return Some(self.file.user_name.clone());
        }
        self.file.users.get(&id.0).cloned()
    }

    /// How a conversation reads: `all`, the group's name, `@peer`.
    fn label(&self, conv: &ConvId) -> String {
        match conv {
            ConvId::All => "all".to_owned(),
            ConvId::Group(name) => name.clone(),
            ConvId::Private { .. } => match conv.peer_of(self.me) {
                Some(peer) => format!(
                    "@{}",
                    self.name_of(peer).unwrap_or_else(|| peer.0.to_string())
                ),
                None => conv.to_string(),
            },
        }
    }

    /// A message as a line, the way live ones read: `[@bob] bob: hi`, `[all] ann: hi`.
    fn plain(&self, m: &SeenMessage) -> String {
        // Local history written before the name was known has none: use what is known now.
        let who = if m.sender == self.me.0 {
            "you".to_owned()
        } else {
            m.sender_name
                .clone()
                .or_else(|| self.name_of(UserId(m.sender)))
                .unwrap_or_else(|| format!("user {}", m.sender))
        };
        let label = m
            .conv
            .parse::<ConvId>()
            .map_or_else(|_| m.conv.clone(), |conv| self.label(&conv));
        if self.verbose {
            format!("[{label} #{}] {who}: {}", m.seq, m.text)
        } else {
            format!("[{label}] {who}: {}", m.text)
        }
    }

    fn token(&mut self) -> Option<String> {
        let token = self.client.token();
        if token.is_none() {
            self.error(
                Failure::Unreachable,
                "not online yet: wait for \"online as ...\" and try again",
            );
        }
        token
    }

    /// Fetches the online list, learning names. `soon`: skip if fetched very recently.
    pub async fn refresh_online(&mut self, soon: bool) -> Result<Vec<OnlineUser>, String> {
        let now = Clock::System.now();
        if soon
            && self
                .last_refresh
                .is_some_and(|at| now < at + REFRESH_MIN_GAP)
        {
            return Err("refreshed a moment ago".to_owned());
        }
        let token = self
            .client
            .token()
            .ok_or("not online yet: wait for \"online as ...\" and try again")?;
        self.last_refresh = Some(now);
        let users = self.api.online_users(&token).await.map_err(|e| match e {
            ApiError::Status { message, .. } => message,
            _ => "the route did not answer; try again in a moment".to_owned(),
        })?;
        for u in &users {
            self.file.users.insert(u.user_id, u.user_name.clone());
        }
        if let Ok(mut c) = self.completions.lock() {
            c.users = users.iter().map(|u| u.user_name.clone()).collect();
            c.users.sort();
            c.users.dedup();
        }
        Ok(users)
    }

    /// Learns the names of those of `ids` not known yet, in one batched lookup by id
    /// (`POST /userNames`), and keeps them (in the state file too). Ids the route has no
    /// account for are not asked again this run; after a failed lookup, none are asked
    /// for `REFRESH_MIN_GAP`.
    async fn learn_names(&mut self, ids: &[u64]) {
        let missing: BTreeSet<u64> = ids
            .iter()
            .copied()
            .filter(|id| {
                *id != self.me.0
                    && !self.file.users.contains_key(id)
                    && !self.looked_up.contains(id)
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        let now = Clock::System.now();
        if self
            .names_failed_at
            .is_some_and(|at| now < at + REFRESH_MIN_GAP)
        {
            return;
        }
        let Some(token) = self.client.token() else {
            return;
        };
        let users: Vec<UserId> = missing.iter().copied().map(UserId).collect();
        match self.api.user_names(&token, &users).await {
            Ok(found) => {
                self.names_failed_at = None;
                if let Ok(mut c) = self.completions.lock() {
                    c.users.extend(found.iter().map(|u| u.user_name.clone()));
                    c.users.sort();
                    c.users.dedup();
                }
                for user in found {
                    self.file.users.insert(user.user_id, user.user_name);
                }
                let unknown = missing
                    .into_iter()
                    .filter(|id| !self.file.users.contains_key(id));
                self.looked_up.extend(unknown);
            }
            Err(error) => {
                tracing::debug!(%error, "user names not looked up");
                self.names_failed_at = Some(now);
            }
        }
    }

    fn publish_users(&self) {
        if let Ok(mut c) = self.completions.lock() {
            c.users = self.file.users.values().cloned().collect();
            c.users.sort();
            c.users.dedup();
        }
    }

    async fn show_online(&mut self, prefix: Option<String>) {
        match self.refresh_online(false).await {
            Ok(mut users) => {
                if let Some(prefix) = &prefix {
                    users.retain(|u| u.user_name.starts_with(prefix.as_str()));
                }
                users.sort_by(|a, b| a.user_name.cmp(&b.user_name));
                let list: Vec<String> = users
                    .iter()
                    .map(|u| format!("{} ({})", u.user_name, u.user_id))
                    .collect();
                let text = format!("online ({}): {}", users.len(), list.join(", "));
                let command = if prefix.is_some() { "pu" } else { "olu" };
                self.sink.result(
                    command,
                    serde_json::to_value(&users).unwrap_or_default(),
                    &text,
                );
            }
            Err(error) => self.error(Failure::Unreachable, &error),
        }
    }

    async fn show_info(&mut self) {
        let outbox = match self.client.snapshot().await {
            Ok(state) => state.outbox.len(),
            Err(_) => 0,
        };
        let (server, epoch) = match &self.server {
            Some((s, e)) => (Some(s.clone()), Some(*e)),
            None => (None, None),
        };
        let online = self.is_online();
        let now = Clock::System.wall().0;
        let mut delays: Vec<&PendingDelay> = self.file.delayed.iter().collect();
        delays.sort_by_key(|d| d.due_at_ms);
        let json = serde_json::json!({
            "userId": self.me.0,
            "userName": self.file.user_name,
            "route": self.route,
            "server": server,
            "epoch": epoch,
            "online": online,
            "outbox": outbox,
            "delayed": delays.iter().map(|d| serde_json::json!({
                "dueAt": d.due_at_ms,
                "line": d.line,
            })).collect::<Vec<_>>(),
            "stateFile": self.path.display().to_string(),
            "localHistory": self.history.len(),
        });
        let status = if online {
            "online"
        } else if self.stopped.is_some() {
            "stopped"
        } else if self.was_online {
            "reconnecting"
        } else {
            "logging in"
        };
        let mut text = format!(
            "user {} (id {}) via route {}, {status}",
            self.file.user_name, self.me.0, self.route,
        );
        if self.verbose {
            text.push_str(&format!(
                "\nserver {} epoch {}",
                server.as_deref().unwrap_or("-"),
                epoch.map_or("-".to_owned(), |e| e.to_string()),
            ));
        }
        text.push_str(&format!(
            "\n{outbox} message(s) not acknowledged yet, {} delayed",
            delays.len()
        ));
        for d in &delays {
            text.push_str(&format!(
                "\n  in {}s: {}",
                d.due_at_ms.saturating_sub(now).div_ceil(1000),
                d.line
            ));
        }
        text.push_str(&format!(
            "\nlocal history {} messages, state {}",
            self.history.len(),
            self.path.display()
        ));
        self.sink.result("info", json, &text);
    }

    async fn show_history(&mut self, of: Option<String>, count: u32) {
        // A word that is no known user is taken for a group; if the route then refuses,
        // say both.
        let mut guessed_group = None;
        let conv = match of.as_deref() {
            None | Some("all") => ConvId::All,
            Some(word) => {
                let word = word.strip_prefix('@').unwrap_or(word);
                if let Ok(conv) = word.parse::<ConvId>() {
                    conv
                } else if let Ok(id) = word.parse::<u64>() {
                    match ConvId::private(self.me, UserId(id)) {
                        Some(conv) => conv,
                        None => return self.error(Failure::BadLine, "that is you"),
                    }
                } else if self.id_of(word).is_some() || self.is_online_name(word).await {
                    match self.resolve(&Target::UserName(word.to_owned())).await {
                        Ok(conv) => conv,
                        Err((failure, error)) => return self.error(failure, &error),
                    }
                } else {
                    guessed_group = Some(word.to_owned());
                    match ConvId::group(word) {
                        Ok(conv) => conv,
                        Err(error) => return self.error(Failure::BadLine, &error.to_string()),
                    }
                }
            }
        };
        let Some(token) = self.token() else { return };
        match self.api.history(&token, &conv, None, count).await {
            Ok(history) => {
                // Every unknown sender of the page in one lookup.
                let mut ids: Vec<u64> = history.messages.iter().map(|m| m.sender_id).collect();
                ids.extend(conv.peer_of(self.me).map(|p| p.0));
                self.learn_names(&ids).await;
                let messages: Vec<SeenMessage> = history
                    .messages
                    .iter()
                    .map(|m| SeenMessage {
                        conv: history.conv.clone(),
                        seq: m.seq,
                        sender: m.sender_id,
                        sender_name: self.name_of(UserId(m.sender_id)),
                        text: m.msg.clone(),
                        at: m.sent_at_ms,
                    })
                    .collect();
                let mut text = format!(
                    "history of {}: the last {} of {} message(s)",
                    self.label(&conv),
                    messages.len(),
                    history.head_seq
                );
                for m in &messages {
                    text.push_str(&format!("\n  {}", self.plain(m)));
                }
                self.sink.result(
                    "his",
                    serde_json::to_value(&messages).unwrap_or_default(),
                    &text,
                );
            }
            Err(ApiError::Status { http: 403, .. }) if let Some(word) = guessed_group => {
                self.error(
                    Failure::BadLine,
                    &format!(
                        "{word} is neither a group you are in nor a user online or seen here (@<id> reaches anyone: :his <id>)"
                    ),
                );
            }
            Err(error) => self.api_error(&error),
        }
    }

    async fn is_online_name(&mut self, name: &str) -> bool {
        self.refresh_online(true)
            .await
            .is_ok_and(|users| users.iter().any(|u| u.user_name == name))
    }

    async fn group_call(&mut self, what: &'static str, group: String) {
        if let Err(error) = ConvId::group(&group) {
            return self.error(Failure::BadLine, &error.to_string());
        }
        let Some(token) = self.token() else { return };
        let done = match what {
            "join" => self.api.join_group(&token, self.me, &group).await,
            "leave" => self.api.leave_group(&token, self.me, &group).await,
            _ => self.api.create_group(&token, self.me, &group).await,
        };
        match done {
            Ok(()) => {
                if let Ok(mut c) = self.completions.lock() {
                    if what == "leave" {
                        c.groups.retain(|g| *g != group);
                    } else if !c.groups.contains(&group) {
                        c.groups.push(group.clone());
                    }
                }
                let past = match what {
                    "join" => "joined",
                    "leave" => "left",
                    _ => "created",
                };
                let text = format!("{past} {group}");
                self.sink.result(what, serde_json::json!(group), &text);
            }
            Err(error) => self.api_error(&error),
        }
    }

    /// Reports one SDK event. `Some` when the session was started again (the account was
    /// registered anew): the caller reads that new event stream from then on.
    pub async fn on_event(&mut self, event: ClientEvent) -> Option<Events> {
        match event {
            ClientEvent::Message(m) => {
                // A sender not seen before (a synced message, someone now offline) is
                // looked up by id once; the name is kept in the state file.
                let mut ids = vec![m.sender.0];
                ids.extend(m.conv.peer_of(self.me).map(|p| p.0));
                self.learn_names(&ids).await;
                let sender_name = self.name_of(m.sender);
                let seen = SeenMessage {
                    conv: m.conv.to_string(),
                    seq: m.seq,
                    sender: m.sender.0,
                    sender_name,
                    text: String::from_utf8_lossy(&m.body).into_owned(),
                    at: m.appended_at.0,
                };
                if let Err(error) = self.history.push(seen.clone()) {
                    tracing::debug!(%error, "local history not written");
                }
                let own = m.sender == self.me;
                // Our own message was already reported as acknowledged; in a terminal that
                // is enough. Scripts get every message.
                let echo = own && self.echo_pending.remove(&m.msg_id);
                if !(echo && matches!(self.sink, Sink::Terminal { .. })) {
                    let label = self.label(&m.conv);
                    self.sink.message(&seen, &label, own);
                }
            }
            ClientEvent::Acked {
                msg_id, conv, seq, ..
            } => {
                let label = self
                    .sending
                    .remove(&msg_id)
                    .unwrap_or_else(|| self.label(&conv));
                self.this_run.remove(&msg_id);
                self.echo_pending.insert(msg_id);
                let detail = if self.verbose {
                    format!(" #{seq} ({})", short(msg_id))
                } else {
                    String::new()
                };
                self.sink
                    .status(Level::Quiet, &format!("✓ acknowledged {label}{detail}"));
                self.save().await;
            }
            ClientEvent::Rejected {
                msg_id,
                code,
                reason,
            } => {
                let label = self.sending.remove(&msg_id).unwrap_or_default();
                self.this_run.remove(&msg_id);
                let (failure, words) = match code {
                    ErrorCode::BodyTooLarge => (Failure::TooLong, error_words(code).to_owned()),
                    // A private conversation with an id that is nobody's.
                    ErrorCode::UnknownUser | ErrorCode::BadConversation
                        if label.starts_with('@') =>
                    {
                        (
                            Failure::UnknownRecipient,
                            format!("there is no user {}", &label[1..]),
                        )
                    }
                    ErrorCode::BadConversation if label != "all" => (
                        Failure::MessageRejected,
                        format!("there is no group {label} (:create {label} makes it)"),
                    ),
                    ErrorCode::NotMember if label != "all" => (
                        Failure::MessageRejected,
                        format!("you are not a member of {label} (:join {label} first)"),
                    ),
                    _ if reason.is_empty() || !self.verbose => {
                        (Failure::MessageRejected, error_words(code).to_owned())
                    }
                    _ => (Failure::MessageRejected, reason),
                };
                self.error(
                    failure,
                    &format!("not delivered to {label}: {words} (not resent)"),
                );
                self.save().await;
            }
            ClientEvent::Unknown { msg_id } => {
                let label = self.sending.remove(&msg_id).unwrap_or_default();
                self.this_run.remove(&msg_id);
                self.fail(Failure::Unreachable);
                self.sink.status(
                    Level::Warn,
                    &format!(
                        "? a message to {label} was not acknowledged in time: it may or may not have been delivered (not resent)"
                    ),
                );
                self.save().await;
            }
            ClientEvent::Online { server, epoch } => {
                let place = if self.verbose {
                    format!(" on {server} (epoch {})", epoch.0)
                } else {
                    String::new()
                };
                let text = if self.was_online {
                    format!("* reconnected{place}")
                } else {
                    format!(
                        "* online as {} (id {}){place}",
                        self.file.user_name, self.me.0
                    )
                };
                self.server = Some((server.to_string(), epoch.0));
                self.was_online = true;
                self.reconnecting = false;
                self.sink.status(Level::Info, &text);
                if self.file.note_epoch(epoch.0) {
                    // Ids may name other people now: names are looked up afresh.
                    self.looked_up.clear();
                    self.publish_users();
                    self.sink.status(
                        Level::Warn,
                        "* the chat's data was reset since your last visit: names are looked up again",
                    );
                }
                let _ = self.refresh_online(false).await;
                self.save().await;
            }
            ClientEvent::Reconnecting {
                attempt,
                delay,
                cause,
            } => {
                self.reconnecting = true;
                if !self.was_online
                    && matches!(
                        cause,
                        ConnectionLoss::LoginFailed(LoginFailure::Rejected(
                            LoginError::RepeatLogin
                        ))
                    )
                {
                    self.blocked_elsewhere = true;
                    self.fail(Failure::LoggedInElsewhere);
                    if matches!(self.sink, Sink::Json) {
                        // A script does not wait for another person's session: it stops.
                        self.sink.error(&format!(
                            "{} is logged in elsewhere, from a client without this machine's state file: quit that session first",
                            self.file.user_name
                        ));
                        return None;
                    }
                }
                let attempt = if self.verbose {
                    format!(", attempt {}", attempt + 1)
                } else {
                    String::new()
                };
                self.sink.status(
                    Level::Warn,
                    &format!(
                        "* reconnecting in {:.1}s ({}{attempt})",
                        delay.as_secs_f32(),
                        describe(&cause, &self.file.user_name, &self.route, self.verbose),
                    ),
                );
            }
            // These two stop the session; `Stopped` says what happened.
            ClientEvent::Kicked(KickReason::TakenOver | KickReason::LoggedOut) => {}
            ClientEvent::Kicked(reason) => {
                self.sink
                    .status(Level::Warn, &format!("* kicked: {}", kick_words(reason)));
            }
            // Told by `Stopped(PasswordNeeded)`, which follows.
            ClientEvent::LoginRejected(LoginError::ResumeRefused) => {}
            ClientEvent::LoginRejected(error) => {
                self.fail(Failure::LoginRejected);
                let text = match error {
                    LoginError::AccountMismatch => format!(
                        "login rejected: wrong password for {} (or user id {} is not {})",
                        self.file.user_name, self.me.0, self.file.user_name
                    ),
                    other => format!("login rejected: {other}"),
                };
                self.sink.error(&text);
            }
            ClientEvent::TlsFailed { host, reason } => {
                self.drop_unsent = true;
                self.error(
                    Failure::Tls,
                    &format!("TLS with {host} cannot work: {reason}"),
                );
            }
            ClientEvent::Stopped(StopReason::AccountMismatch)
                if self.may_reregister && !self.was_online =>
            {
                self.may_reregister = false;
                if let Some(events) = self.reregister().await {
                    // Not a failure after all: the account is back.
                    self.failure = None;
                    return Some(events);
                }
                self.on_stopped(StopReason::AccountMismatch);
            }
            ClientEvent::Stopped(reason) => self.on_stopped(reason),
            ClientEvent::Unavailable {
                conv,
                from_seq,
                count,
            } => {
                let label = self.label(&conv);
                self.sink.status(
                    Level::Warn,
                    &if self.verbose {
                        format!("— [{label}] {count} message(s) no longer available (from #{from_seq}) —")
                    } else {
                        format!("— [{label}] {count} earlier message(s) no longer available —")
                    },
                );
            }
            ClientEvent::LogReset { conv, .. } => {
                // A log recreated under a new epoch: the store lost it (a reset, a restore).
                // Ids may name other people now, so every remembered name goes; they are
                // looked up again by id before the log's messages are shown.
                self.file.users.clear();
                self.looked_up.clear();
                self.publish_users();
                let label = self.label(&conv);
                self.sink.status(
                    Level::Warn,
                    &format!("— [{label}] conversation reset; earlier unread messages are lost —"),
                );
            }
            // A store restart carried the conversation over: nothing to show unless it lost
            // messages this client had already shown.
            ClientEvent::LogMoved { lost: 0, .. } => {}
            ClientEvent::LogMoved {
                conv,
                continues_after,
                lost,
                ..
            } => {
                let label = self.label(&conv);
                self.sink.status(
                    Level::Warn,
                    &if self.verbose {
                        format!(
                            "— [{label}] {lost} message(s) lost by the server (#{} on); new ones follow —",
                            continues_after + 1
                        )
                    } else {
                        format!("— [{label}] {lost} message(s) shown above were lost by the server —")
                    },
                );
            }
            ClientEvent::LoggingIn | ClientEvent::Connecting { .. } => {}
        }
        None
    }

    fn on_stopped(&mut self, reason: StopReason) {
        match reason {
            StopReason::Shutdown => {}
            StopReason::TakenOver => self.error(
                Failure::LoggedInElsewhere,
                &format!(
                    "{} logged in elsewhere (another terminal, a --send, another device), which took this session over",
                    self.file.user_name
                ),
            ),
            StopReason::LoggedOut => {
                self.error(Failure::LoggedInElsewhere, "stopped: logged out");
            }
            StopReason::AccountMismatch => {
                self.drop_unsent = true;
                self.error(
                    Failure::LoginRejected,
                    &format!(
                        "stopped: check the password (if the chat's data was reset, move {} away to register {} again)",
                        self.path.display(),
                        self.file.user_name
                    ),
                );
            }
            StopReason::TlsFailed => {
                self.drop_unsent = true;
                self.fail(Failure::Tls);
            }
            // The unsent messages stay in the file: the next run, with the password, sends
            // them.
            StopReason::PasswordNeeded => self.error(
                Failure::LoginRejected,
                &format!(
                    "the saved session of {} can no longer log in without the password (it was used elsewhere, revoked or has expired): run again and give the password",
                    self.file.user_name
                ),
            ),
        }
        if self.drop_unsent && !self.this_run.is_empty() {
            self.sink.status(
                Level::Warn,
                &format!(
                    "{} message(s) of this run not sent, and not kept for a later run",
                    self.this_run.len()
                ),
            );
        }
        self.stopped = Some(reason);
    }

    /// Starts a session again after another login took this one over. The other login's
    /// resume token, if that client shares this state file (same machine), takes the claim
    /// back at once; otherwise the login waits until the other session ends.
    pub async fn take_back(&mut self) -> Option<Events> {
        let mut state = self.client.snapshot().await.unwrap_or_default();
        if let Ok(Some(disk)) = client_file::load(&self.path)
            && disk.user_id == self.me.0
            && let Ok(Some(disk)) = disk.session_state()
            && disk.resume_token.is_some()
        {
            state.resume_token = disk.resume_token;
        }
        self.stopped = None;
        self.failure = None;
        self.sink
            .status(Level::Info, "* taking the session back ...");
        Some(self.restart(state).await)
    }

    /// Replaces the SDK client by a new one started from `state`.
    async fn restart(&mut self, state: ClientState) -> Events {
        self.client.clone().shutdown().await;
        let config = ClientConfig::new(
            self.me,
            self.file.user_name.clone(),
            self.password.clone(),
            sdk::os_seed(),
        );
        let mut options = SdkOptions::new(self.host.clone(), self.port, config);
        options.tls = self.tls.clone();
        options.state = Some(state);
        let (client, events) = Client::start(TokioNet, Clock::System, options);
        self.api = client.route_api();
        self.client = client;
        events
    }

    /// The route does not know this id with this name and password. If the name is free,
    /// the store was reset (or the account deleted): register it again and start over with
    /// the new id, keeping the unsent messages. If it is taken, the password is wrong.
    async fn reregister(&mut self) -> Option<Events> {
        let name = self.file.user_name.clone();
        let registered = self.api.register(&name, &self.password).await.ok()?;
        let mut state = self.client.snapshot().await.unwrap_or_default();
        // The token and read positions belonged to the old account.
        state.resume_token = None;
        state.convs.clear();
        let old = self.me;
        self.me = UserId(registered.user_id);
        self.file.user_id = registered.user_id;
        // A store that forgot this account forgot everyone: the ids seen name nobody, or
        // other people now.
        self.file.users.clear();
        self.file.last_epoch = None;
        self.looked_up.clear();
        self.publish_users();
        let events = self.restart(state).await;
        self.sink.status(
            Level::Warn,
            &format!(
                "* the chat no longer knew {name} (its data was reset): registered again, now id {} (was {})",
                self.me.0, old.0
            ),
        );
        self.save().await;
        Some(events)
    }

    /// Saves the session (outbox, resume token, positions) and names to the state file.
    pub async fn save(&mut self) {
        if self.stopped == Some(StopReason::TakenOver) {
            // The login that took over may share this file: its resume token and outbox
            // are the current ones. Keep them.
            if let Ok(Some(disk)) = client_file::load(&self.path) {
                self.file.session = disk.session;
            }
        } else {
            let Ok(mut state) = self.client.snapshot().await else {
                return;
            };
            if self.drop_unsent {
                state.outbox.retain(|m| !self.this_run.contains(&m.id));
            }
            self.file.set_session(&state);
        }
        let path = self.path.clone();
        let file = self.file.clone();
        match tokio::task::spawn_blocking(move || client_file::save(&path, &file)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => self.sink.error(&format!("saving state: {error}")),
            Err(error) => self.sink.error(&format!("saving state: {error}")),
        }
    }

    /// Unacknowledged messages, or `None` if the session is gone.
    pub async fn outbox_len(&self) -> Option<usize> {
        self.client.snapshot().await.ok().map(|s| s.outbox.len())
    }

    pub async fn finish(mut self) {
        self.save().await;
        if let Err(error) = self.history.compact() {
            tracing::debug!(%error, "local history not compacted");
        }
        self.client.shutdown().await;
    }
}

/// The first 8 hex digits of a message id: enough to tell one's messages apart.
fn short(id: ClientMsgId) -> String {
    id.to_string().chars().take(8).collect()
}

/// Why the link was lost, in words. `verbose` adds the protocol's details.
fn describe(cause: &ConnectionLoss, user: &str, route: &str, verbose: bool) -> String {
    match cause {
        ConnectionLoss::LoginFailed(LoginFailure::Rejected(LoginError::RepeatLogin)) => format!(
            "{user} is logged in elsewhere, from a client without this machine's state file; \
             waiting for that session to end"
        ),
        ConnectionLoss::LoginFailed(LoginFailure::Rejected(LoginError::NoServerAvailable)) => {
            "no chat server is up".to_owned()
        }
        ConnectionLoss::LoginFailed(LoginFailure::Rejected(LoginError::Unavailable)) => {
            "the chat's store is not answering".to_owned()
        }
        ConnectionLoss::LoginFailed(LoginFailure::Rejected(error)) => error.to_string(),
        ConnectionLoss::LoginFailed(failure) if verbose => {
            format!("cannot reach the route at {route}: {failure}")
        }
        ConnectionLoss::LoginFailed(_) => format!("cannot reach the route at {route}"),
        ConnectionLoss::LoginTimeout => format!("the route at {route} did not answer"),
        ConnectionLoss::ConnectFailed => "the chat server is unreachable".to_owned(),
        ConnectionLoss::ConnectTimeout => "connecting to the server timed out".to_owned(),
        ConnectionLoss::LoginOkTimeout => "the server did not accept the login".to_owned(),
        ConnectionLoss::Disconnected => "connection lost".to_owned(),
        ConnectionLoss::HeartbeatTimeout => "the server stopped answering".to_owned(),
        ConnectionLoss::Kicked(reason) => format!("kicked: {}", kick_words(*reason)),
        ConnectionLoss::ServerError { code, message } if message.is_empty() || !verbose => {
            format!("server error: {}", error_words(*code))
        }
        ConnectionLoss::ServerError { code, message } => {
            format!("server error: {} ({message})", error_words(*code))
        }
    }
}

/// Why the server closed the session, in words a chat user reads.
fn kick_words(reason: KickReason) -> &'static str {
    match reason {
        KickReason::Unspecified => "by the server",
        KickReason::TakenOver => "this user logged in elsewhere",
        KickReason::SlowConsumer => "too slow to keep up",
        KickReason::Idle => "silent too long",
        KickReason::LoginTimeout => "login took too long",
        KickReason::Fenced => "the server lost its store",
        KickReason::Draining => "the server is shutting down",
        KickReason::ProtocolError => "protocol error",
        KickReason::LoggedOut => "logged out",
    }
}

/// A server's error code in words.
fn error_words(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Unspecified => "unspecified error",
        ErrorCode::MalformedFrame => "malformed frame",
        ErrorCode::FrameTooLarge => "frame too large",
        ErrorCode::BodyTooLarge => "message too long",
        ErrorCode::BadTicket => "bad login ticket",
        ErrorCode::TicketExpired => "login ticket expired",
        ErrorCode::WrongServer => "wrong server",
        ErrorCode::StaleEpoch => "a newer login exists",
        ErrorCode::NotLoggedIn => "not logged in",
        ErrorCode::RateLimited => "sending too fast",
        ErrorCode::NotMember => "not a member",
        ErrorCode::BadConversation => "no such conversation",
        ErrorCode::ConflictingRetry => "message id reused with another text",
        ErrorCode::Unavailable => "temporarily unavailable",
        ErrorCode::UnexpectedFrame => "unexpected frame",
        ErrorCode::UnknownUser => "unknown user",
        ErrorCode::OutOfOrder => "waiting for your earlier message",
        ErrorCode::Superseded => "a later message of yours was stored first",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kicks_and_errors_read_as_words_not_enum_names() {
        assert_eq!(
            describe(
                &ConnectionLoss::Kicked(KickReason::Draining),
                "ann",
                "r:1",
                false
            ),
            "kicked: the server is shutting down"
        );
        assert_eq!(
            describe(
                &ConnectionLoss::ServerError {
                    code: ErrorCode::RateLimited,
                    message: "limit 50/s (bucket 3)".into()
                },
                "ann",
                "r:1",
                false
            ),
            "server error: sending too fast"
        );
        let transport =
            ConnectionLoss::LoginFailed(LoginFailure::Transport("connect: refused".into()));
        assert_eq!(
            describe(&transport, "ann", "r:1", false),
            "cannot reach the route at r:1"
        );
        assert!(describe(&transport, "ann", "r:1", true).contains("refused"));
        let repeat = ConnectionLoss::LoginFailed(LoginFailure::Rejected(LoginError::RepeatLogin));
        assert!(describe(&repeat, "ann", "r:1", false).contains("ann is logged in elsewhere"));
        let reasons = (0..=8).filter_map(|n| KickReason::try_from(n).ok());
        let codes = (0..=15).filter_map(|n| ErrorCode::try_from(n).ok());
        let words: Vec<&str> = reasons
            .map(kick_words)
            .chain(codes.map(error_words))
            .collect();
        assert_eq!(words.len(), 9 + 16);
        for w in words {
            // An enum name (`Draining`, `RateLimited`) would start upper case or be one word
            // of mixed case; words are lower case.
            assert_eq!(w, w.to_lowercase(), "{w}");
        }
    }
}
