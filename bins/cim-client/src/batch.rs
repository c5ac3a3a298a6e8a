//! The non-interactive mode: lines from `--send` and stdin, JSON lines out.

use std::time::Duration;

use cim_core::client::StopReason;
use cim_io::clock::Clock;
use cim_io::sdk::Events;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::app::App;
use crate::command::{self, Command, Target};
use crate::render::Level;

/// How often the end-of-input wait looks at the outbox.
const DRAIN_POLL: Duration = Duration::from_millis(50);

pub async fn run(
    mut app: App,
    mut events: Events,
    mut delayed: mpsc::UnboundedReceiver<(Target, String)>,
    sends: Vec<String>,
    read_stdin: bool,
    drain: Duration,
) -> bool {
    let (lines_tx, mut lines) = mpsc::channel::<String>(64);
    tokio::spawn(async move {
        for line in sends {
            if lines_tx.send(line).await.is_err() {
                return;
            }
        }
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
    let mut input_done = false;
    let mut delays_pending = 0usize;
    let mut deadline = None;
    let mut poll = tokio::time::interval(DRAIN_POLL);
    let mut save_tick = tokio::time::interval(crate::app::SAVE_EVERY);
    save_tick.tick().await;
    let quit = loop {
        tokio::select! {
            biased;
            Some(event) = events.next() => {
                if let Some(restarted) = app.on_event(event).await {
                    events = restarted;
                }
                if app.stopped.is_some() {
                    break false;
                }
            }
            Some((target, text)) = delayed.recv() => {
                delays_pending = delays_pending.saturating_sub(1);
                app.say(target, text).await;
            }
            line = lines.recv(), if !input_done => match line {
                Some(line) => {
                    if matches!(command::parse(&line), Ok(Command::Delay(..))) {
                        delays_pending += 1;
                    }
                    if !app.on_line(&line).await {
                        break true;
                    }
                }
                None => input_done = true,
            },
            _ = save_tick.tick() => app.save().await,
            _ = poll.tick(), if input_done => {
                if delays_pending > 0 {
                    continue;
                }
                let deadline = *deadline.get_or_insert_with(|| Clock::System.now() + drain);
                match app.outbox_len().await {
                    Some(0) | None => break true,
                    Some(n) if Clock::System.now() >= deadline => {
                        app.sink.status(
                            Level::Warn,
                            &format!("{n} message(s) not acknowledged yet: saved, resent next time"),
                        );
                        break true;
                    }
                    Some(_) => {}
                }
            }
        }
    };
    // Events already delivered (our own acks, messages) are still reported.
    while let Some(event) = events.try_next() {
        if app.on_event(event).await.is_some() {
            break;
        }
    }
    let ok = quit && app.stopped.is_none_or(|r| r == StopReason::Shutdown);
    app.finish().await;
    ok
}
