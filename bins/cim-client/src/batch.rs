//! The non-interactive mode: lines from `--send` and stdin, JSON lines out.

use std::time::Duration;

use cim_core::client::StopReason;
use cim_io::clock::Clock;
use cim_io::sdk::Events;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::app::App;

use crate::render::Level;

/// How often the end-of-input wait looks at the outbox.
const DRAIN_POLL: Duration = Duration::from_millis(50);

pub async fn run(
    mut app: App,
    mut events: Events,
    mut delayed: mpsc::UnboundedReceiver<u64>,
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
            Some(id) = delayed.recv() => app.fire_delay(id).await,
            line = lines.recv(), if !input_done => match line {
                Some(line) => {
                    if !app.on_line(&line).await {
                        break true;
                    }
                }
                None => input_done = true,
            },
            _ = save_tick.tick() => app.save().await,
            _ = poll.tick(), if input_done => {
                if app.awaiting_delays() > 0 {
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
    let delays = app.pending_delays();
    if delays > 0 {
        app.sink.status(
            Level::Info,
            &format!("{delays} delayed message(s) saved; sent at their time by the next run"),
        );
    }
    let ok = quit && app.stopped.is_none_or(|r| r == StopReason::Shutdown);
    app.finish().await;
    ok
}
