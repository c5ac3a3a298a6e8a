//! `cim-client`: chat at the console. Logs in through the route, holds the connection to
//! the assigned server (reconnecting by itself), and reads commands from stdin. Works with
//! piped stdin too: at end of input it waits briefly for its messages to be acknowledged,
//! saves its state and exits, so scripts can drive it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use cim_core::client::{ClientConfig, ClientEvent, LinkLoss, LoginFailure, StopReason};
use cim_core::ids::{ConvId, UserId};
use cim_io::clock::Clock;
use cim_io::net::TokioNet;
use cim_io::sdk::{self, Client, Events, RouteApi, SdkOptions, state_file};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

const COMMANDS: &str = "\
Commands (one per line on stdin):
  <text>                  say <text> in the group chat `all`
  :p <userId> <text>      private message to a user
  :g <group> <text>       message to a group you are a member of
  :create <group>         create a group (you join it)
  :join <group>           join a group
  :leave <group>          leave a group
  :groups                 list your groups
  :online                 list online users
  :history <conv> [n]     the last n (default 20, max 100) messages of a conversation:
                          all, a group name or g:<name>, a user id or p:<low>:<high>
  :help                   this list
  :q                      save state and quit

Incoming messages print as `[conv] <senderId>: text`; status lines start with `*`,
errors with `!`.";

/// CIM's console chat client.
#[derive(Debug, Parser)]
#[command(name = "cim-client", version, after_help = COMMANDS)]
struct Args {
    /// The route's HTTP API, host:port.
    #[arg(long, env = "CIM_ROUTE", default_value = "127.0.0.1:8083")]
    route: String,
    /// Your user id (printed by --register).
    #[arg(long, env = "CIM_USER_ID")]
    user_id: Option<u64>,
    /// Your user name.
    #[arg(long, env = "CIM_NAME")]
    name: String,
    /// Your password.
    #[arg(long, env = "CIM_PASSWORD", hide_env_values = true)]
    password: String,
    /// Register --name/--password as a new account first, print its id, then chat as it.
    #[arg(long)]
    register: bool,
    /// Where to keep the resume token, unsent messages and read positions between runs
    /// (loaded at start, saved every few seconds and on exit).
    /// [default: ./cim-client-<userId>.json]
    #[arg(long, env = "CIM_STATE")]
    state: Option<PathBuf>,
    /// At end of input, how long to wait for sent messages to be acknowledged, in seconds.
    #[arg(long, default_value_t = 5)]
    drain_secs: u64,
}

/// HTTP calls to the route (register, groups, history).
const API_TIMEOUT: Duration = Duration::from_secs(10);
const SAVE_EVERY: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> ExitCode {
    match chat(Args::parse()).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("cim-client: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn chat(args: Args) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let (host, port) = parse_host_port(&args.route)?;

    let user = if args.register {
        let api = RouteApi::new(TokioNet, host.clone(), port, API_TIMEOUT);
        let registered = api
            .register(&args.name, &args.password)
            .await
            .context("registering")?;
        println!(
            "* registered {} as user id {}",
            registered.user_name, registered.user_id
        );
        UserId(registered.user_id)
    } else {
        match args.user_id {
            Some(id) => UserId(id),
            None => bail!("--user-id (or CIM_USER_ID) is required, or --register a new account"),
        }
    };

    let state_path = args
        .state
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("cim-client-{}.json", user.0)));
    // A file that does not parse is not overwritten: it may hold unsent messages.
    let state = state_file::load(&state_path).with_context(|| {
        format!(
            "reading {} (move it away to start without it)",
            state_path.display()
        )
    })?;

    // Message ids must never repeat across runs: seed from the OS's entropy every start.
    let config = ClientConfig::new(
        user,
        args.name.clone(),
        args.password.clone(),
        sdk::os_seed(),
    );
    let mut options = SdkOptions::new(host, port, config);
    options.state = state;
    let (client, events) = Client::start(TokioNet, Clock::System, options);

    let (stopped_tx, mut stopped_rx) = mpsc::unbounded_channel();
    tokio::spawn(print_events(events, stopped_tx));

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut save_timer = tokio::time::interval(SAVE_EVERY);
    save_timer.tick().await;
    let mut exit_code = ExitCode::SUCCESS;
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => match parse_line(&line, user) {
                    Ok(Command::Quit) => break,
                    Ok(command) => run(&client, user, command).await,
                    Err(error) => println!("! {error} (:help lists the commands)"),
                },
                Ok(None) => {
                    drain(&client, Duration::from_secs(args.drain_secs)).await;
                    break;
                }
                Err(error) => {
                    println!("! reading stdin: {error}");
                    break;
                }
            },
            reason = stopped_rx.recv() => {
                // The session will not reconnect by itself (taken over, logged out, bad
                // credentials): leave, keeping what it had.
                if reason != Some(StopReason::Shutdown) {
                    exit_code = ExitCode::FAILURE;
                }
                break;
            }
            _ = save_timer.tick() => save(&client, &state_path).await,
        }
    }
    save(&client, &state_path).await;
    client.shutdown().await;
    Ok(exit_code)
}

fn parse_host_port(text: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = text
        .rsplit_once(':')
        .with_context(|| format!("--route {text:?}: expected host:port"))?;
    let port = port
        .parse()
        .with_context(|| format!("--route {text:?}: bad port"))?;
    Ok((host.trim_matches(['[', ']']).to_owned(), port))
}

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Nothing,
    Say(ConvId, String),
    Create(String),
    Join(String),
    Leave(String),
    Groups,
    Online,
    History(ConvId, u32),
    Help,
    Quit,
}

fn parse_line(line: &str, me: UserId) -> Result<Command, String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(Command::Nothing);
    }
    let Some(rest) = line.strip_prefix(':') else {
        return Ok(Command::Say(ConvId::All, line.to_owned()));
    };
    let (word, rest) = split_word(rest);
    let group = |name: &str| -> Result<String, String> {
        ConvId::group(name).map_err(|e| e.to_string())?;
        Ok(name.to_owned())
    };
    match word {
        "p" => {
            let (to, text) = split_word(rest);
            let to: u64 = to.parse().map_err(|_| format!("not a user id: {to:?}"))?;
            let conv = ConvId::private(me, UserId(to)).ok_or_else(|| "that is you".to_owned())?;
            non_empty(text).map(|t| Command::Say(conv, t))
        }
        "g" => {
            let (name, text) = split_word(rest);
            let conv = ConvId::group(name).map_err(|e| e.to_string())?;
            non_empty(text).map(|t| Command::Say(conv, t))
        }
        "create" => group(rest).map(Command::Create),
        "join" => group(rest).map(Command::Join),
        "leave" => group(rest).map(Command::Leave),
        "groups" => Ok(Command::Groups),
        "online" => Ok(Command::Online),
        "history" => {
            let (conv, n) = split_word(rest);
            let conv = parse_conv(conv, me)?;
            let n = if n.is_empty() {
                20
            } else {
                n.parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| format!("not a count from 1 to 100: {n:?}"))?
            };
            Ok(Command::History(conv, n))
        }
        "help" | "h" | "?" => Ok(Command::Help),
        "q" | "quit" => Ok(Command::Quit),
        other => Err(format!("unknown command :{other}")),
    }
}

/// A conversation as typed: canonical (`all`, `g:x`, `p:1:2`), a group name, or a user id.
fn parse_conv(text: &str, me: UserId) -> Result<ConvId, String> {
    if let Ok(conv) = text.parse::<ConvId>() {
        return Ok(conv);
    }
    if let Ok(id) = text.parse::<u64>() {
        return ConvId::private(me, UserId(id)).ok_or_else(|| "that is you".to_owned());
    }
    ConvId::group(text).map_err(|_| format!("not a conversation: {text:?}"))
}

fn split_word(text: &str) -> (&str, &str) {
    let text = text.trim_start();
    match text.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim()),
        None => (text, ""),
    }
}

fn non_empty(text: &str) -> Result<String, String> {
    if text.is_empty() {
        Err("nothing to say".to_owned())
    } else {
        Ok(text.to_owned())
    }
}

async fn run(client: &Client<TokioNet>, me: UserId, command: Command) {
    let api = client.route_api();
    let need_token = || {
        let token = client.token();
        if token.is_none() {
            println!("! not logged in yet");
        }
        token
    };
    match command {
        Command::Nothing | Command::Quit => {}
        Command::Help => println!("{COMMANDS}"),
        Command::Say(conv, text) => {
            // Acks arrive as events; only failures are printed.
            if let Err(error) = client.submit(conv, text.into_bytes().into()).await {
                println!("! {error}");
            }
        }
        Command::Create(name) => {
            if let Some(token) = need_token() {
                let done = api.create_group(&token, me, &name).await;
                report(done.map(|()| format!("* created group {name}")));
            }
        }
        Command::Join(name) => {
            if let Some(token) = need_token() {
                let done = api.join_group(&token, me, &name).await;
                report(done.map(|()| format!("* joined group {name}")));
            }
        }
        Command::Leave(name) => {
            if let Some(token) = need_token() {
                let done = api.leave_group(&token, me, &name).await;
                report(done.map(|()| format!("* left group {name}")));
            }
        }
        Command::Groups => {
            if let Some(token) = need_token() {
                report(api.list_groups(&token).await.map(|groups| {
                    if groups.is_empty() {
                        "* no groups (besides all)".to_owned()
                    } else {
                        format!("* groups: {}", groups.join(", "))
                    }
                }));
            }
        }
        Command::Online => {
            if let Some(token) = need_token() {
                report(api.online_users(&token).await.map(|users| {
                    let list: Vec<String> = users
                        .iter()
                        .map(|u| format!("{} ({}) on {}", u.user_name, u.user_id, u.server_id))
                        .collect();
                    format!("* online: {}", list.join(", "))
                }));
            }
        }
        Command::History(conv, n) => {
            if let Some(token) = need_token() {
                report(api.history(&token, &conv, None, n).await.map(|history| {
                    let mut out = format!(
                        "* history of {} (head {}, {} shown)",
                        history.conv,
                        history.head_seq,
                        history.messages.len()
                    );
                    for m in &history.messages {
                        out.push_str(&format!(
                            "\n[{} #{}] {}: {}",
                            history.conv, m.seq, m.sender_id, m.msg
                        ));
                    }
                    out
                }));
            }
        }
    }
}

fn report(result: Result<String, sdk::ApiError>) {
    match result {
        Ok(text) => println!("{text}"),
        Err(error) => println!("! {error}"),
    }
}

async fn print_events(mut events: Events, stopped: mpsc::UnboundedSender<StopReason>) {
    while let Some(event) = events.next().await {
        match event {
            ClientEvent::Message(m) => println!(
                "[{}] {}: {}",
                m.conv,
                m.sender,
                String::from_utf8_lossy(&m.body)
            ),
            ClientEvent::Online { server, epoch } => {
                println!("* online on server {server} (epoch {})", epoch.0);
            }
            ClientEvent::Reconnecting {
                attempt,
                delay,
                cause,
            } => println!(
                "* reconnecting in {} ms ({}, attempt {})",
                delay.as_millis(),
                describe(&cause),
                attempt + 1
            ),
            ClientEvent::Kicked(reason) => println!("* kicked: {reason:?}"),
            ClientEvent::LoginRejected(error) => println!("! login rejected: {error}"),
            ClientEvent::Stopped(reason) => {
                match reason {
                    StopReason::Shutdown => {}
                    StopReason::TakenOver => {
                        println!("* stopped: this user logged in elsewhere");
                    }
                    StopReason::LoggedOut => println!("* stopped: logged out"),
                    StopReason::AccountMismatch => {
                        println!("! stopped: wrong user id, name or password");
                    }
                }
                let _ = stopped.send(reason);
            }
            ClientEvent::Rejected { reason, code, .. } => {
                println!("! message rejected ({code:?}): {reason}");
            }
            ClientEvent::Unknown { msg_id } => println!(
                "! message {msg_id} was not acknowledged in time: it may not have been delivered"
            ),
            ClientEvent::Unavailable {
                conv,
                from_seq,
                count,
            } => println!("* [{conv}] {count} older messages unavailable (from #{from_seq})"),
            ClientEvent::LogReset { conv, .. } => {
                println!("* [{conv}] conversation was reset; earlier unread messages are lost");
            }
            ClientEvent::LoggingIn | ClientEvent::Connecting { .. } | ClientEvent::Acked { .. } => {
            }
        }
    }
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
        LinkLoss::Kicked(reason) => format!("kicked: {reason:?}"),
        LinkLoss::ServerError { code, message } => format!("server error {code:?}: {message}"),
    }
}

/// Waits until every sent message is acknowledged (or failed), at most `limit`.
async fn drain(client: &Client<TokioNet>, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        match client.snapshot().await {
            Ok(state) if state.outbox.is_empty() => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => return,
        }
    }
    println!("! some messages are not acknowledged yet; they are saved and resent next time");
}

async fn save(client: &Client<TokioNet>, path: &std::path::Path) {
    let Ok(state) = client.snapshot().await else {
        return;
    };
    let path = path.to_owned();
    let saved = tokio::task::spawn_blocking(move || state_file::save(&path, &state)).await;
    match saved {
        Ok(Ok(())) => {}
        Ok(Err(error)) => println!("! saving state: {error}"),
        Err(error) => println!("! saving state: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_into_commands() {
        let me = UserId(5);
        assert_eq!(
            parse_line("hello there", me),
            Ok(Command::Say(ConvId::All, "hello there".into()))
        );
        assert_eq!(
            parse_line(":p 9 hi you", me),
            Ok(Command::Say(
                ConvId::private(me, UserId(9)).unwrap(),
                "hi you".into()
            ))
        );
        assert_eq!(
            parse_line(":g rust  hey", me),
            Ok(Command::Say(ConvId::group("rust").unwrap(), "hey".into()))
        );
        assert_eq!(
            parse_line(":create rust", me),
            Ok(Command::Create("rust".into()))
        );
        assert_eq!(
            parse_line(":history rust 5", me),
            Ok(Command::History(ConvId::group("rust").unwrap(), 5))
        );
        assert_eq!(
            parse_line(":history 9", me),
            Ok(Command::History(
                ConvId::private(me, UserId(9)).unwrap(),
                20
            ))
        );
        assert_eq!(
            parse_line(":history all", me),
            Ok(Command::History(ConvId::All, 20))
        );
        assert_eq!(parse_line("  ", me), Ok(Command::Nothing));
        assert_eq!(parse_line(":q", me), Ok(Command::Quit));
        for bad in [
            ":p 5 me",
            ":p x hi",
            ":p 9",
            ":g bad! x",
            ":history all 500",
            ":nope",
        ] {
            assert!(parse_line(bad, me).is_err(), "{bad}");
        }
    }

    #[test]
    fn route_addresses_parse() {
        assert_eq!(
            parse_host_port("127.0.0.1:8083").unwrap(),
            ("127.0.0.1".to_owned(), 8083)
        );
        assert_eq!(parse_host_port("[::1]:80").unwrap(), ("::1".to_owned(), 80));
        assert!(parse_host_port("nohost").is_err());
    }

    #[test]
    fn help_is_complete() {
        use clap::CommandFactory;
        Args::command().debug_assert();
        let help = Args::command().render_long_help().to_string();
        for word in [
            "--route",
            "--user-id",
            "--register",
            "--state",
            ":history",
            ":q",
        ] {
            assert!(help.contains(word), "{word} missing from --help");
        }
    }
}
