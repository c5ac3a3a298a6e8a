//! The non-interactive mode: lines from `--send` and stdin, JSON lines out.
//!
//! Lines wait for the session: until the first login succeeds they are queued in order
//! (as are `:delay`s that fall due), so `:olu` or `:his bob` piped in at once work, and a
//! message is never queued under a login that then fails. If the session never comes up
//! (route or servers unreachable until the drain deadline), the queued messages go into
//! the outbox, which is saved and sent by the next run; queued commands are reported as
//! not run. A login refused for good (wrong password, untrusted certificate, logged in
//! elsewhere) ends the run at once, and nothing of it is kept.

use std::collections::VecDeque;
use std::time::Duration;

use cim_io::clock::Clock;
use cim_io::sdk::Events;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::app::App;
use crate::command::{self, Command};
use crate::exit::Failure;
use crate::render::Level;

/// How often the end-of-input wait looks at the outbox.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Input waiting for the session.
#[derive(Debug)]
enum Held {
    Line(String),
    Delay(u64),
}

/// Runs until the input is done and acknowledged, or the drain deadline. The first failure
/// met, if any: the exit code.
pub async fn run(
    mut app: App,
    mut events: Events,
    mut delayed: mpsc::UnboundedReceiver<u64>,
    sends: Vec<String>,
    read_stdin: bool,
    drain: Duration,
) -> Option<Failure> {
    let (lines_tx, mut lines) = mpsc::channel::<String>(64);
    tokio::spawn(async move {
        if !read_stdin {
            return;
        }
        let mut stdin = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            if lines_tx.send(line).await.is_err() {
                return;
            }
        }
    });
    // `--send` lines are input known from the start: queued at once, so a session that
    // stops before the first event still accounts for them.
    let mut held: VecDeque<Held> = sends.into_iter().map(Held::Line).collect();
    let mut input_done = false;
    // `:q!` read: what follows it is not run.
    let mut quit = false;
    let mut deadline = None;
    let mut poll = tokio::time::interval(DRAIN_POLL);
    let mut save_tick = tokio::time::interval(crate::app::SAVE_EVERY);
    save_tick.tick().await;
    'run: loop {
        tokio::select! {
            biased;
            Some(event) = events.next() => {
                if let Some(restarted) = app.on_event(event).await {
                    events = restarted;
                }
                if app.stopped.is_some() {
                    break;
                }
                // A second client without this state file holds the session: waiting
                // would only repeat that until the drain deadline.
                if app.blocked_elsewhere && !app.was_online() {
                    break;
                }
                if app.was_online() {
                    while let Some(next) = held.pop_front() {
                        match next {
                            Held::Line(line) => {
                                if !app.on_line(&line).await {
                                    quit = true;
                                    break 'run;
                                }
                            }
                            Held::Delay(id) => app.fire_delay(id).await,
                        }
                    }
                }
            }
            Some(id) = delayed.recv() => {
                if app.was_online() {
                    app.fire_delay(id).await;
                } else {
                    held.push_back(Held::Delay(id));
                }
            }
            line = lines.recv(), if !input_done => match line {
                Some(line) if app.was_online() && held.is_empty() => {
                    if !app.on_line(&line).await {
                        quit = true;
                        break;
                    }
                }
                Some(line) => held.push_back(Held::Line(line)),
                None => input_done = true,
            },
            _ = save_tick.tick() => app.save().await,
            _ = poll.tick(), if input_done => {
                let deadline = *deadline.get_or_insert_with(|| Clock::System.now() + drain);
                let past = Clock::System.now() >= deadline;
                if !held.is_empty() || app.awaiting_delays() > 0 {
                    if past {
                        break;
                    }
                    continue;
                }
                match app.outbox_len().await {
                    Some(0) | None => break,
                    Some(n) if past => {
                        app.fail(Failure::Unreachable);
                        app.sink.status(
                            Level::Warn,
                            &format!("{n} message(s) not acknowledged yet: saved, resent next time"),
                        );
                        break;
                    }
                    Some(_) => {}
                }
            }
        }
    }
    if quit {
        held.clear();
    } else {
        // Lines already read but not handled yet are accounted for with the rest.
        while let Ok(line) = lines.try_recv() {
            held.push_back(Held::Line(line));
        }
    }
    // Events already delivered (our own acks, messages) are still reported.
    while let Some(event) = events.try_next() {
        if app.on_event(event).await.is_some() {
            break;
        }
    }
    if !held.is_empty() {
        settle_held(&mut app, held).await;
    }
    let delays = app.pending_delays();
    if delays > 0 {
        app.sink.status(
            Level::Info,
            &format!("{delays} delayed message(s) saved; sent at their time by the next run"),
        );
    }
    let failure = app.failure;
    app.finish().await;
    failure
}

/// Input still queued at the end: the session never came up. Messages go into the outbox
/// for the next run, unless the login was refused for good; commands did not run.
async fn settle_held(app: &mut App, held: VecDeque<Held>) {
    let refused = app.stopped.is_some() || app.blocked_elsewhere;
    if !refused {
        app.fail(Failure::Unreachable);
    }
    let (mut kept, mut dropped, mut skipped) = (0, 0, 0);
    for next in held {
        match next {
            // A delay stays pending in the state file either way.
            Held::Delay(_) => {}
            Held::Line(line) => match command::parse(&line) {
                Ok(Command::Say(..)) if !refused => {
                    app.on_line(&line).await;
                    kept += 1;
                }
                Ok(Command::Say(..)) => dropped += 1,
                Ok(Command::Nothing | Command::Quit) => {}
                Ok(_) => skipped += 1,
                // Reported as any bad line is.
                Err(_) => {
                    app.on_line(&line).await;
                }
            },
        }
    }
    if kept > 0 {
        app.sink.status(
            Level::Warn,
            &format!("never online: {kept} message(s) saved, sent by the next run"),
        );
    }
    if dropped > 0 {
        app.sink.status(
            Level::Warn,
            &format!("{dropped} message(s) not sent, and not kept for a later run"),
        );
    }
    if skipped > 0 {
        app.sink
            .error(&format!("never online: {skipped} command(s) not run"));
    }
}
