//! Certificate reload without dropping connections: on SIGHUP, and when a file's
//! modification time changes, every TLS configuration of the process reads its files again.
//! New handshakes use the new files; open connections keep the session they have. A bad
//! file is refused with a log line and the previous configuration stays (see
//! [`super::ServerTls::reload`]). Once a day the expiry warning is repeated.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::{ClientTls, ServerTls};

/// How often the files' modification times are compared.
pub const DEFAULT_POLL: Duration = Duration::from_secs(10);

const DAY: Duration = Duration::from_secs(24 * 3600);

/// One configuration to reload.
#[derive(Debug, Clone)]
pub enum Reloadable {
    Server(ServerTls),
    Client(ClientTls),
}

impl Reloadable {
    fn files(&self) -> Vec<PathBuf> {
        match self {
            Reloadable::Server(tls) => tls.inner.settings.files(),
            Reloadable::Client(tls) => tls.inner.settings.files(),
        }
    }

    fn reload(&self) {
        // Both log the outcome; an error leaves the previous configuration in use.
        let _ = match self {
            Reloadable::Server(tls) => tls.reload(),
            Reloadable::Client(tls) => tls.reload(),
        };
    }
}

fn modified(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|file| std::fs::metadata(file).and_then(|m| m.modified()).ok())
        .collect()
}

/// Watches for SIGHUP and changed files until `cancel`. Spawns nothing when `targets` is
/// empty. Call it inside the tokio runtime. When it returns, the SIGHUP handler is in place
/// (SIGHUP's default action would end the process) and the files' current state is the
/// baseline: a signal or a change from then on reloads.
pub fn spawn_reloader(targets: Vec<Reloadable>, poll: Duration, cancel: CancellationToken) {
    if targets.is_empty() {
        return;
    }
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(%error, "no SIGHUP handler: TLS files reload on change only");
            None
        }
    };
    let mut seen: Vec<_> = targets.iter().map(|t| modified(&t.files())).collect();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut daily = tokio::time::interval_at(tokio::time::Instant::now() + DAY, DAY);
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = hup => {
                    tracing::info!("SIGHUP: reloading TLS certificates");
                    for (target, seen) in targets.iter().zip(seen.iter_mut()) {
                        *seen = modified(&target.files());
                        target.reload();
                    }
                }
                _ = tick.tick() => {
                    for (target, seen) in targets.iter().zip(seen.iter_mut()) {
                        let now = modified(&target.files());
                        if now != *seen {
                            *seen = now;
                            target.reload();
                        }
                    }
                }
                // Reloading the same files repeats the expiry warning if it is due.
                _ = daily.tick() => targets.iter().for_each(Reloadable::reload),
            }
        }
    });
}
