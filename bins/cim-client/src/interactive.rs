//! The terminal mode: a line editor (history, tab completion) on its own thread, incoming
//! messages printed above the prompt through rustyline's external printer.

use std::borrow::Cow;
use std::path::PathBuf;
use std::time::Duration;

use cim_core::client::StopReason;
use cim_io::clock::Clock;
use cim_io::sdk::Events;
use rustyline::completion::{Completer, Pair};
use rustyline::config::Configurer;
use rustyline::error::ReadlineError;
use rustyline::highlight::{CmdKind, Highlighter};
use rustyline::hint::Hinter;
use rustyline::history::{DefaultHistory, FileHistory};
use rustyline::validate::Validator;
use rustyline::{ColorMode, CompletionType, Config, Context, Editor, ExternalPrinter, Helper};
use tokio::sync::mpsc;

use crate::app::{App, SharedCompletions};
use crate::command::COMMANDS;
use crate::exit::Failure;
use crate::render::Level;

/// Lines kept in the editor's history file.
const LINE_HISTORY: usize = 1000;
/// How often the online list is refreshed for completion.
const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// At `:q!`, how long to wait for the last messages' acknowledgements (only while online:
/// offline there is nothing to wait for, they are saved for the next run).
const QUIT_DRAIN: Duration = Duration::from_secs(3);
/// How long Tab waits for a fresh online list before completing from what it has.
const COMPLETION_WAIT: Duration = Duration::from_millis(700);

/// Completes commands, `@names` of online users, and group names after group commands.
#[derive(Debug)]
pub struct ChatHelper {
    completions: SharedCompletions,
    /// Asks the app to refresh the online list (on `@` completion); the app answers on
    /// the sender it is given once the list is fresh.
    refresh: mpsc::UnboundedSender<std::sync::mpsc::Sender<()>>,
}

impl ChatHelper {
    fn users(&self) -> Vec<String> {
        self.completions
            .lock()
            .map(|c| c.users.clone())
            .unwrap_or_default()
    }

    fn groups(&self) -> Vec<String> {
        self.completions
            .lock()
            .map(|c| c.groups.clone())
            .unwrap_or_default()
    }

    /// Candidates for the word ending at `pos`: (start of the word, replacements).
    pub fn candidates(&self, line: &str, pos: usize) -> (usize, Vec<String>) {
        let before = &line[..pos];
        let start = before.rfind(char::is_whitespace).map_or(0, |i| i + 1);
        let word = &before[start..];
        let first = before.split_whitespace().next().unwrap_or("");
        let matching = |names: Vec<String>, prefix: &str, sigil: &str| -> Vec<String> {
            names
                .into_iter()
                .filter(|n| n.starts_with(prefix))
                .map(|n| format!("{sigil}{n} "))
                .collect()
        };
        if start == 0 && word.starts_with(':') {
            let words = COMMANDS
                .iter()
                .map(|(w, _, _)| (*w).to_owned())
                .filter(|w| w.starts_with(word))
                .map(|w| format!("{w} "))
                .collect();
            return (start, words);
        }
        if let Some(prefix) = word.strip_prefix('@') {
            let mut found = matching(self.users(), prefix, "@");
            if found.is_empty() {
                // A name not seen yet (someone who just came online): ask the route, and
                // wait a moment for the answer, so the first Tab completes it.
                let (done, fresh) = std::sync::mpsc::channel();
                if self.refresh.send(done).is_ok() {
                    let _ = fresh.recv_timeout(COMPLETION_WAIT);
                }
                found = matching(self.users(), prefix, "@");
            }
            return (start, found);
        }
        // The first argument of a command taking a user or a group.
        let arg_index = before[..start].split_whitespace().count();
        if arg_index == 1 {
            let names = match first {
                ":pu" => self.users(),
                ":his" => {
                    let mut names = self.users();
                    names.extend(self.groups());
                    names
                }
                ":g" | ":join" | ":leave" => self.groups(),
                _ => Vec::new(),
            };
            return (start, matching(names, word, ""));
        }
        (start, Vec::new())
    }
}

impl Completer for ChatHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let (start, words) = self.candidates(line, pos);
        let pairs = words
            .into_iter()
            .map(|w| Pair {
                display: w.trim_end().to_owned(),
                replacement: w,
            })
            .collect();
        Ok((start, pairs))
    }
}

impl Hinter for ChatHelper {
    type Hint = String;
}
impl Highlighter for ChatHelper {}
impl Validator for ChatHelper {}
impl Helper for ChatHelper {}

/// Hides what is typed (each character shows as nothing), for the password.
#[derive(Debug, Default)]
struct Masking;

impl Completer for Masking {
    type Candidate = String;
}
impl Hinter for Masking {
    type Hint = String;
}
impl Validator for Masking {}
impl Helper for Masking {}
impl Highlighter for Masking {
    fn highlight<'l>(&self, _line: &'l str, _pos: usize) -> Cow<'l, str> {
        Cow::Borrowed("")
    }

    fn highlight_char(&self, _line: &str, _pos: usize, kind: CmdKind) -> bool {
        kind != CmdKind::MoveCursor
    }
}

/// Asks for a password without echoing it.
pub fn read_password(prompt: &str) -> anyhow::Result<String> {
    let mut rl: Editor<Masking, DefaultHistory> = Editor::new()?;
    rl.set_helper(Some(Masking));
    // Masking is done by the highlighter, which only runs with colours on.
    rl.set_color_mode(ColorMode::Forced);
    rl.set_auto_add_history(false);
    // A moving cursor would show the password's length.
    let mut cursor = rl.set_cursor_visibility(false)?;
    let password = rl.readline(prompt);
    drop(cursor.take());
    Ok(password?)
}

pub struct Terminal {
    lines: mpsc::Receiver<Option<String>>,
    go: std::sync::mpsc::Sender<bool>,
    refresh: mpsc::UnboundedReceiver<std::sync::mpsc::Sender<()>>,
    thread: std::thread::JoinHandle<()>,
}

/// Starts the line editor's thread. The printer it returns prints above the prompt.
pub fn start_editor(
    prompt: String,
    history: PathBuf,
    completions: SharedCompletions,
) -> anyhow::Result<(Terminal, crate::render::Printer)> {
    let config = Config::builder()
        .completion_type(CompletionType::List)
        .auto_add_history(true)
        .history_ignore_dups(true)?
        .max_history_size(LINE_HISTORY)?
        .build();
    let (refresh_tx, refresh) = mpsc::unbounded_channel();
    let mut rl: Editor<ChatHelper, FileHistory> = Editor::with_config(config)?;
    rl.set_helper(Some(ChatHelper {
        completions,
        refresh: refresh_tx,
    }));
    // A missing history file is the first run.
    cim_io::private_file::make_owner_only(&history);
    let _ = rl.load_history(&history);
    let mut printer = rl.create_external_printer()?;
    let printer: crate::render::Printer = Box::new(move |mut line: String| {
        // Outside the editor's raw mode the printer writes as is.
        line.push('\n');
        let _ = printer.print(line);
    });
    let (lines_tx, lines) = mpsc::channel(1);
    let (go, go_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        loop {
            match rl.readline(&prompt) {
                Ok(line) => {
                    if lines_tx.blocking_send(Some(line)).is_err() {
                        break;
                    }
                    // Wait until the line is handled: its output comes before the next
                    // prompt, and a quit never leaves the terminal in raw mode.
                    if go_rx.recv() != Ok(true) {
                        break;
                    }
                }
                // Ctrl-C clears the line, as in a shell; say how to leave.
                Err(ReadlineError::Interrupted) => {
                    println!("(Ctrl-C clears the line; :q! or Ctrl-D quits)");
                }
                Err(_) => {
                    let _ = lines_tx.blocking_send(None);
                    break;
                }
            }
        }
        let _ = rl.save_history(&history);
        // Typed lines include private messages.
        cim_io::private_file::make_owner_only(&history);
    });
    Ok((
        Terminal {
            lines,
            go,
            refresh,
            thread,
        },
        printer,
    ))
}

pub async fn run(
    mut app: App,
    mut events: Events,
    mut delayed: mpsc::UnboundedReceiver<u64>,
    mut terminal: Terminal,
) -> Option<Failure> {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.tick().await;
    let mut save_tick = tokio::time::interval(crate::app::SAVE_EVERY);
    save_tick.tick().await;
    app.sink.status(
        Level::Quiet,
        "type to chat in `all`, @name to whisper, :help for commands, Tab completes",
    );
    loop {
        tokio::select! {
            biased;
            Some(event) = events.next() => {
                if let Some(restarted) = app.on_event(event).await {
                    events = restarted;
                }
                match app.stopped {
                    None | Some(StopReason::Shutdown) => {}
                    Some(StopReason::TakenOver) => app.sink.status(
                        Level::Warn,
                        "press Enter to take the session back (that other login is then stopped), or :q! to quit",
                    ),
                    Some(_) => app.sink.status(Level::Warn, "press Enter to exit"),
                }
            }
            Some(id) = delayed.recv() => app.fire_delay(id).await,
            Some(done) = terminal.refresh.recv() => {
                // Asked for by a Tab that found no name: fetch even if fetched a moment ago
                // (someone may have just come online).
                let _ = app.refresh_online(false).await;
                let _ = done.send(());
            }
            line = terminal.lines.recv() => match line {
                Some(Some(line)) => {
                    let go = match app.stopped {
                        None => app.on_line(&line).await,
                        Some(StopReason::TakenOver) if !matches!(
                            crate::command::parse(&line),
                            Ok(crate::command::Command::Quit)
                        ) => {
                            if let Some(restarted) = app.take_back().await {
                                events = restarted;
                            }
                            true
                        }
                        Some(_) => false,
                    };
                    let _ = terminal.go.send(go);
                    if !go {
                        break;
                    }
                }
                _ => break,
            },
            _ = tick.tick() => {
                let _ = app.refresh_online(true).await;
            }
            _ = save_tick.tick() => app.save().await,
        }
    }
    drop(terminal.go);
    let _ = terminal.thread.join();
    // A moment for the last messages' acknowledgements; what is left is saved and resent
    // next time.
    let deadline = Clock::System.now() + QUIT_DRAIN;
    while app.is_online()
        && app.outbox_len().await.is_some_and(|n| n > 0)
        && Clock::System.now() < deadline
    {
        tokio::select! {
            Some(event) = events.next() => {
                if let Some(restarted) = app.on_event(event).await {
                    events = restarted;
                }
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    if let Some(n) = app.outbox_len().await.filter(|n| *n > 0) {
        app.sink.status(
            Level::Warn,
            &format!("{n} unacknowledged message(s) saved; they are sent next time"),
        );
    }
    let delays = app.pending_delays();
    if delays > 0 {
        app.sink.status(
            Level::Info,
            &format!("{delays} delayed message(s) saved; sent at their time by the next run"),
        );
    }
    // Only what ended the session counts here: a mistyped line at the terminal was
    // answered there and is no reason for a failing exit.
    let failure = match app.stopped {
        None | Some(StopReason::Shutdown) => None,
        Some(StopReason::TakenOver | StopReason::LoggedOut) => Some(Failure::LoggedInElsewhere),
        Some(StopReason::AccountMismatch | StopReason::PasswordNeeded) => {
            Some(Failure::LoginRejected)
        }
        Some(StopReason::TlsFailed) => Some(Failure::Tls),
    };
    app.finish().await;
    failure
}
