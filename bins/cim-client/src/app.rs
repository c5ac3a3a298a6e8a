//! The chat session both modes share: runs commands, turns SDK events into output, keeps
//! the state file and the local history up to date.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cim_core::client::{
    ClientConfig, ClientEvent, ErrorCode, KickReason, LinkLoss, LoginFailure, StopReason,
};
use cim_core::ids::{ClientMsgId, ConvId, UserId};
use cim_io::api::OnlineUser;
use cim_io::clock::Clock;
use cim_io::net::TokioNet;
use cim_io::sdk::{self, Client, Events, RouteApi, SdkOptions, SdkTls};
use tokio::sync::mpsc;

use crate::command::{self, Command, ParseError, Target};
use crate::render::{Level, Sink};
use crate::store::{self, ClientFile, LocalHistory, PendingDelay, SeenMessage};

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
/// Messages fetched by `:his`.
const HISTORY_LIMIT: u32 = 20;

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
    last_refresh: Option<std::time::Instant>,
    /// Ids the route was asked to name and had no account for: not asked again this run.
    looked_up: BTreeSet<u64>,
    /// When a name lookup last failed: lookups pause for `REFRESH_MIN_GAP` after it, so a
    /// route that is down is not asked once per message.
    names_failed_at: Option<std::time::Instant>,
    pub stopped: Option<StopReason>,
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
}

impl App {
    pub fn new(parts: AppParts) -> Self {
        let history = LocalHistory::load(
            store::sibling(&parts.path, "history.jsonl"),
            store::HISTORY_CAP,
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
        };
        app.publish_users();
        app
    }

    /// Runs one typed line. `false` when the user asked to quit.
    pub async fn on_line(&mut self, line: &str) -> bool {
        let command = match command::parse(line) {
            Ok(command) => command,
            Err(error @ ParseError::Unknown(_)) => {
                // Never sent: a mistyped command must not leak into a conversation.
                self.sink.error(&format!("{error} (not sent)"));
                self.sink
                    .result("help", serde_json::Value::Null, &command::help());
                return true;
            }
            Err(error) => {
                self.sink.error(&error.to_string());
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
            Command::History(of) => self.show_history(of).await,
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
                    Err(error) => self.sink.error(&error.to_string()),
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
        let conv = match self.resolve(&target).await {
            Ok(conv) => conv,
            Err(error) => {
                self.sink.error(&error);
                return;
            }
        };
        let label = self.label(&conv);
        match self.client.submit(conv, text.into_bytes().into()).await {
            Ok(id) => {
                self.sending.insert(id, label.clone());
                self.sink.status(
                    Level::Quiet,
                    &format!("· sending to {label} ({})", short(id)),
                );
                // The outbox is on disk before the user sees "sending": a crash now resends it.
                self.save().await;
            }
            Err(error) => self.sink.error(&error.to_string()),
        }
    }

    async fn resolve(&mut self, target: &Target) -> Result<ConvId, String> {
        match target {
            Target::All => Ok(ConvId::All),
            Target::Group(name) => ConvId::group(name).map_err(|e| e.to_string()),
            Target::UserId(id) => {
                ConvId::private(self.me, UserId(*id)).ok_or_else(|| "that is you".to_owned())
            }
            Target::UserName(name) => {
                let id = match self.id_of(name) {
                    Some(id) => id,
                    None => {
                        let _ = self.refresh_online(true).await;
                        self.id_of(name)
                            .ok_or_else(|| format!("unknown user {name} (not online; try @<id>)"))?
                    }
                };
                ConvId::private(self.me, UserId(id)).ok_or_else(|| "that is you".to_owned())
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

    fn plain(&self, m: &SeenMessage) -> String {
        // Local history written before the name was known has none: use what is known now.
        let who = m
            .sender_name
            .clone()
            .or_else(|| self.name_of(UserId(m.sender)))
            .unwrap_or_else(|| format!("#{}", m.sender));
        format!("[{} #{}] {who}: {}", m.conv, m.seq, m.text)
    }

    fn token(&mut self) -> Option<String> {
        let token = self.client.token();
        if token.is_none() {
            self.sink.error("not logged in yet");
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
        let token = self.client.token().ok_or("not logged in yet")?;
        self.last_refresh = Some(now);
        let users = self
            .api
            .online_users(&token)
            .await
            .map_err(|e| e.to_string())?;
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
            Err(error) => self.sink.error(&error),
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
        let json = serde_json::json!({
            "userId": self.me.0,
            "userName": self.file.user_name,
            "route": self.route,
            "server": server,
            "epoch": epoch,
            "online": !self.reconnecting && server.is_some(),
            "outbox": outbox,
            "stateFile": self.path.display().to_string(),
            "localHistory": self.history.len(),
        });
        let text = format!(
            "user {} ({}) via route {}\nserver {} epoch {}{}\noutbox {} unacknowledged, local history {} messages\nstate {}",
            self.file.user_name,
            self.me.0,
            self.route,
            server.as_deref().unwrap_or("-"),
            epoch.map_or("-".to_owned(), |e| e.to_string()),
            if self.reconnecting {
                " (reconnecting)"
            } else {
                ""
            },
            outbox,
            self.history.len(),
            self.path.display(),
        );
        self.sink.result("info", json, &text);
    }

    async fn show_history(&mut self, of: Option<String>) {
        let conv = match of.as_deref() {
            None | Some("all") => ConvId::All,
            Some(word) => {
                let word = word.strip_prefix('@').unwrap_or(word);
                if let Ok(conv) = word.parse::<ConvId>() {
                    conv
                } else if let Ok(id) = word.parse::<u64>() {
                    match ConvId::private(self.me, UserId(id)) {
                        Some(conv) => conv,
                        None => return self.sink.error("that is you"),
                    }
                } else if self.id_of(word).is_some() || self.is_online_name(word).await {
                    match self.resolve(&Target::UserName(word.to_owned())).await {
                        Ok(conv) => conv,
                        Err(error) => return self.sink.error(&error),
                    }
                } else {
                    match ConvId::group(word) {
                        Ok(conv) => conv,
                        Err(error) => return self.sink.error(&error.to_string()),
                    }
                }
            }
        };
        let Some(token) = self.token() else { return };
        match self.api.history(&token, &conv, None, HISTORY_LIMIT).await {
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
                    "history of {} ({} of {} shown)",
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
            Err(error) => self.sink.error(&error.to_string()),
        }
    }

    async fn is_online_name(&mut self, name: &str) -> bool {
        self.refresh_online(true)
            .await
            .is_ok_and(|users| users.iter().any(|u| u.user_name == name))
    }

    async fn group_call(&mut self, what: &'static str, group: String) {
        if let Err(error) = ConvId::group(&group) {
            return self.sink.error(&error.to_string());
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
            Err(error) => self.sink.error(&error.to_string()),
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
                self.echo_pending.insert(msg_id);
                self.sink.status(
                    Level::Quiet,
                    &format!("✓ acknowledged {label} #{seq} ({})", short(msg_id)),
                );
                self.save().await;
            }
            ClientEvent::Rejected {
                msg_id,
                code,
                reason,
            } => {
                let label = self.sending.remove(&msg_id).unwrap_or_default();
                self.sink.error(&format!(
                    "rejected {label} ({}): {}",
                    short(msg_id),
                    if reason.is_empty() {
                        error_words(code)
                    } else {
                        &reason
                    }
                ));
                self.save().await;
            }
            ClientEvent::Unknown { msg_id } => {
                let label = self.sending.remove(&msg_id).unwrap_or_default();
                self.sink.status(
                    Level::Warn,
                    &format!(
                        "? unknown {label} ({}): not acknowledged in time, may or may not be delivered",
                        short(msg_id)
                    ),
                );
                self.save().await;
            }
            ClientEvent::Online { server, epoch } => {
                let text = if self.was_online {
                    format!("* reconnected to {server} (epoch {})", epoch.0)
                } else {
                    format!(
                        "* online as {} ({}) on {server} (epoch {})",
                        self.file.user_name, self.me.0, epoch.0
                    )
                };
                self.server = Some((server.to_string(), epoch.0));
                self.was_online = true;
                self.reconnecting = false;
                self.sink.status(Level::Info, &text);
                let _ = self.refresh_online(false).await;
                self.save().await;
            }
            ClientEvent::Reconnecting {
                attempt,
                delay,
                cause,
            } => {
                self.reconnecting = true;
                self.sink.status(
                    Level::Warn,
                    &format!(
                        "* reconnecting in {:.1}s ({}, attempt {})",
                        delay.as_secs_f32(),
                        describe(&cause),
                        attempt + 1
                    ),
                );
            }
            ClientEvent::Kicked(reason) => {
                self.sink
                    .status(Level::Warn, &format!("* kicked: {}", kick_words(reason)));
            }
            ClientEvent::LoginRejected(error) => {
                self.sink.error(&format!("login rejected: {error}"));
            }
            ClientEvent::Stopped(StopReason::AccountMismatch)
                if self.may_reregister && !self.was_online =>
            {
                self.may_reregister = false;
                if let Some(events) = self.reregister().await {
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
                    &format!("— [{label}] {count} unavailable (from #{from_seq}) —"),
                );
            }
            ClientEvent::LogReset { conv, .. } => {
                let label = self.label(&conv);
                self.sink.status(
                    Level::Warn,
                    &format!("— [{label}] conversation reset; earlier unread messages are lost —"),
                );
            }
            ClientEvent::LoggingIn | ClientEvent::Connecting { .. } => {}
        }
        None
    }

    fn on_stopped(&mut self, reason: StopReason) {
        match reason {
                    StopReason::Shutdown => {}
                StopReason::TakenOver => {
                    self.sink.error("stopped: this user logged in elsewhere");
                }
                StopReason::LoggedOut => self.sink.error("stopped: logged out"),
                StopReason::AccountMismatch => self.sink.error(&format!(
                    "stopped: wrong password, or user {} is not {} (the store may have been reset: move {} away to register again)",
                    self.me.0,
                    self.file.user_name,
                    self.path.display()
                )),
        }
        self.stopped = Some(reason);
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
        self.client.clone().shutdown().await;
        let old = self.me;
        self.me = UserId(registered.user_id);
        self.file.user_id = registered.user_id;
        let config =
            ClientConfig::new(self.me, name.clone(), self.password.clone(), sdk::os_seed());
        let mut options = SdkOptions::new(self.host.clone(), self.port, config);
        options.tls = self.tls.clone();
        options.state = Some(state);
        let (client, events) = Client::start(TokioNet, Clock::System, options);
        self.api = client.route_api();
        self.client = client;
        self.sink.status(
            Level::Warn,
            &format!(
                "* the route no longer knew user {} ({name}): registered again as user {}",
                old.0, self.me.0
            ),
        );
        self.save().await;
        Some(events)
    }

    /// Saves the session (outbox, resume token, positions) and names to the state file.
    pub async fn save(&mut self) {
        let Ok(state) = self.client.snapshot().await else {
            return;
        };
        self.file.set_session(&state);
        let path = self.path.clone();
        let file = self.file.clone();
        match tokio::task::spawn_blocking(move || store::save(&path, &file)).await {
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

fn describe(cause: &LinkLoss) -> String {
    match cause {
        LinkLoss::LoginFailed(LoginFailure::Rejected(error)) => error.to_string(),
        LinkLoss::LoginFailed(LoginFailure::Transport(error)) => format!("route: {error}"),
        LinkLoss::LoginTimeout => "the route did not answer".to_owned(),
        LinkLoss::ConnectFailed => "server unreachable".to_owned(),
        LinkLoss::ConnectTimeout => "connecting to the server timed out".to_owned(),
        LinkLoss::LoginOkTimeout => "the server did not accept the login".to_owned(),
        LinkLoss::Disconnected => "connection lost".to_owned(),
        LinkLoss::HeartbeatTimeout => "the server stopped answering".to_owned(),
        LinkLoss::Kicked(reason) => format!("kicked: {}", kick_words(*reason)),
        LinkLoss::ServerError { code, message } if message.is_empty() => {
            format!("server error: {}", error_words(*code))
        }
        LinkLoss::ServerError { code, message } => {
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
            describe(&LinkLoss::Kicked(KickReason::Draining)),
            "kicked: the server is shutting down"
        );
        assert_eq!(
            describe(&LinkLoss::ServerError {
                code: ErrorCode::RateLimited,
                message: String::new()
            }),
            "server error: sending too fast"
        );
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
