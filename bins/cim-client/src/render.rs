//! Where output goes: a terminal (coloured lines printed above the prompt) or a script
//! (JSON lines on stdout, status on stderr).

use std::io::Write;

use crate::client_file::SeenMessage;

/// Prints one finished line (no trailing newline) without breaking the line being typed.
pub type Printer = Box<dyn FnMut(String) + Send>;

pub enum Sink {
    Terminal { printer: Printer, color: bool },
    Json,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Terminal { .. } => "Sink::Terminal",
            Self::Json => "Sink::Json",
        })
    }
}

const RESET: &str = "\x1b[0m";
const DIM: &str = "\x1b[2m";
const BOLD: &str = "\x1b[1m";
const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
/// Sender names get one of these, by user id, so a conversation is easy to follow.
const NAME_COLORS: [&str; 5] = ["\x1b[36m", "\x1b[35m", "\x1b[34m", "\x1b[32m", "\x1b[33m"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Progress of one's own messages (sending, acknowledged).
    Quiet,
    /// Connection status, command results.
    Info,
    /// Rejections, unknown fates, gaps, errors.
    Warn,
}

impl Sink {
    fn paint(&self, code: &str, text: &str) -> String {
        match self {
            Self::Terminal { color: true, .. } => format!("{code}{text}{RESET}"),
            _ => text.to_owned(),
        }
    }

    fn line(&mut self, text: String) {
        match self {
            Self::Terminal { printer, .. } => printer(text),
            Self::Json => {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{text}");
            }
        }
    }

    /// A received message. `label` is how the conversation reads (`all`, `rust`, `@bob`).
    pub fn message(&mut self, m: &SeenMessage, label: &str, own: bool) {
        match self {
            Self::Json => {
                if let Ok(json) = serde_json::to_string(m) {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{json}");
                    let _ = out.flush();
                }
            }
            Self::Terminal { .. } => {
                let who = if own {
                    self.paint(BOLD, "you")
                } else {
                    let name = m
                        .sender_name
                        .clone()
                        .unwrap_or_else(|| format!("#{}", m.sender));
                    let color = NAME_COLORS[(m.sender % NAME_COLORS.len() as u64) as usize];
                    self.paint(&format!("{BOLD}{color}"), &name)
                };
                let label = self.paint(DIM, &format!("[{label}]"));
                self.line(format!("{label} {who}: {}", m.text));
            }
        }
    }

    pub fn status(&mut self, level: Level, text: &str) {
        let text = match level {
            Level::Quiet => self.paint(DIM, text),
            Level::Info => self.paint(GREEN, text),
            Level::Warn => self.paint(YELLOW, text),
        };
        self.line(text);
    }

    pub fn error(&mut self, text: &str) {
        let text = self.paint(RED, &format!("! {text}"));
        self.line(text);
    }

    /// A command's answer: `json` for scripts, `text` for people.
    pub fn result(&mut self, command: &str, json: serde_json::Value, text: &str) {
        match self {
            Self::Json => {
                let value = serde_json::json!({ "command": command, "result": json });
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{value}");
                let _ = out.flush();
            }
            Self::Terminal { .. } => {
                for line in text.lines() {
                    self.line(line.to_owned());
                }
            }
        }
    }
}
