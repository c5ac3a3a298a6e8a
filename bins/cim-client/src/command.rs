//! What a typed line means. Pure parsing: resolving names to ids and running the command
//! are the app's business, so this is table-tested without a cluster.

use std::time::Duration;

/// Where a message goes, as typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The built-in group every user is in.
    All,
    /// A named group (`:g rust hi`).
    Group(String),
    /// A user by name (`@bob hi`), resolved through the online list / seen users.
    UserName(String),
    /// A user by id (`@42 hi`).
    UserId(u64),
}

impl Target {
    /// The message line that parses back into this target and `text`.
    pub fn line(&self, text: &str) -> String {
        match self {
            Self::All => format!(":g all {text}"),
            Self::Group(group) => format!(":g {group} {text}"),
            Self::UserName(name) => format!("@{name} {text}"),
            Self::UserId(id) => format!("@{id} {text}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// An empty line.
    Nothing,
    Say(Target, String),
    Help,
    /// `:olu`: everyone online.
    Online,
    /// `:pu <prefix>`: online users whose name starts with the prefix.
    OnlinePrefix(String),
    Info,
    /// `:q <keyword>`: search the local history.
    Search(String),
    /// `:his [user|group]`: the server's recent history (of `all` without an argument).
    History(Option<String>),
    /// `:delay <seconds> <message line>`.
    Delay(Duration, Target, String),
    Join(String),
    Leave(String),
    Create(String),
    Groups,
    Quit,
}

/// A line that is not a command. It is never sent as a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("unknown command {0}")]
    Unknown(String),
    #[error("usage: {0}")]
    Usage(&'static str),
}

/// Every command word, for help and tab completion.
pub const COMMANDS: &[(&str, &str)] = &[
    (":help", "this list (alias :all)"),
    (":olu", "online users"),
    (
        ":pu",
        "<prefix>  online users whose name starts with <prefix>",
    ),
    (":info", "who and where you are, outbox size, state file"),
    (":q", "<keyword>  search the local history"),
    (
        ":his",
        "[user|group]  recent history from the server (default: all)",
    ),
    (
        ":delay",
        "<seconds> <message>  send later (plain, @user or :g)",
    ),
    (":g", "<group> <text>  post to a group"),
    (":create", "<group>  create a group and join it"),
    (":join", "<group>  join a group"),
    (":leave", "<group>  leave a group"),
    (":groups", "your groups"),
    (":q!", "save and quit (also Ctrl-D)"),
];

/// The help text.
pub fn help() -> String {
    let mut out =
        String::from("Type text to say it in `all`; `@name text` (or `@<id> text`) to one user.\n");
    for (word, what) in COMMANDS {
        out.push_str(&format!("  {word:<8} {what}\n"));
    }
    out.pop();
    out
}

const MAX_DELAY_SECS: u64 = 24 * 3600;

pub fn parse(line: &str) -> Result<Command, ParseError> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(Command::Nothing);
    }
    if !line.starts_with(':') {
        return parse_message(line).map(|(target, text)| Command::Say(target, text));
    }
    let (word, rest) = split_word(line);
    match word {
        ":help" | ":all" | ":h" | ":?" => Ok(Command::Help),
        ":olu" => Ok(Command::Online),
        ":pu" => one_word(rest, ":pu <prefix>").map(Command::OnlinePrefix),
        ":info" => Ok(Command::Info),
        ":q" if rest.is_empty() => Err(ParseError::Usage(
            ":q <keyword> searches the history; :q! quits",
        )),
        ":q" => Ok(Command::Search(rest.to_owned())),
        ":q!" | ":quit" | ":exit" => Ok(Command::Quit),
        ":his" | ":history" => match rest {
            "" => Ok(Command::History(None)),
            _ => one_word(rest, ":his [user|group]").map(|w| Command::History(Some(w))),
        },
        ":delay" => {
            const USAGE: &str = ":delay <seconds> <message>";
            let (secs, text) = split_word(rest);
            let secs: u64 = secs
                .parse()
                .ok()
                .filter(|s| *s <= MAX_DELAY_SECS)
                .ok_or(ParseError::Usage(USAGE))?;
            if text.is_empty() {
                return Err(ParseError::Usage(USAGE));
            }
            let (target, text) = parse_message(text)?;
            Ok(Command::Delay(Duration::from_secs(secs), target, text))
        }
        ":g" => parse_message(line).map(|(target, text)| Command::Say(target, text)),
        ":join" => one_word(rest, ":join <group>").map(Command::Join),
        ":leave" => one_word(rest, ":leave <group>").map(Command::Leave),
        ":create" => one_word(rest, ":create <group>").map(Command::Create),
        ":groups" => Ok(Command::Groups),
        other => Err(ParseError::Unknown(other.to_owned())),
    }
}

/// A message line: plain text (to `all`), `@user text` or `:g <group> text`.
fn parse_message(line: &str) -> Result<(Target, String), ParseError> {
    if let Some(rest) = line.strip_prefix('@') {
        let (who, text) = split_word(rest);
        if who.is_empty() || text.is_empty() {
            return Err(ParseError::Usage("@<user> <text>"));
        }
        let target = match who.parse::<u64>() {
            Ok(id) => Target::UserId(id),
            Err(_) => Target::UserName(who.to_owned()),
        };
        return Ok((target, text.to_owned()));
    }
    if let Some(rest) = line.strip_prefix(":g ") {
        let (group, text) = split_word(rest);
        if group.is_empty() || text.is_empty() {
            return Err(ParseError::Usage(":g <group> <text>"));
        }
        let target = if group == "all" {
            Target::All
        } else {
            Target::Group(group.to_owned())
        };
        return Ok((target, text.to_owned()));
    }
    if line.starts_with(':') {
        // `:delay 5 :olu` must not send ":olu" as text.
        let (word, _) = split_word(line);
        return Err(ParseError::Unknown(word.to_owned()));
    }
    Ok((Target::All, line.to_owned()))
}

fn one_word(rest: &str, usage: &'static str) -> Result<String, ParseError> {
    let (word, more) = split_word(rest);
    if word.is_empty() || !more.is_empty() {
        return Err(ParseError::Usage(usage));
    }
    Ok(word.to_owned())
}

/// The first word and the rest, trimmed.
pub fn split_word(text: &str) -> (&str, &str) {
    let text = text.trim_start();
    match text.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim()),
        None => (text, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn say(target: Target, text: &str) -> Result<Command, ParseError> {
        Ok(Command::Say(target, text.to_owned()))
    }

    #[test]
    fn lines_parse_into_commands() {
        let s = |x: &str| x.to_owned();
        let table: Vec<(&str, Result<Command, ParseError>)> = vec![
            ("", Ok(Command::Nothing)),
            ("   ", Ok(Command::Nothing)),
            ("hello there", say(Target::All, "hello there")),
            ("  padded  ", say(Target::All, "padded")),
            ("@bob hi you", say(Target::UserName(s("bob")), "hi you")),
            ("@42 hi", say(Target::UserId(42), "hi")),
            ("@bob", Err(ParseError::Usage("@<user> <text>"))),
            ("@ hi", Err(ParseError::Usage("@<user> <text>"))),
            (
                ":g rust  hey there",
                say(Target::Group(s("rust")), "hey there"),
            ),
            (":g all hey", say(Target::All, "hey")),
            (":g rust", Err(ParseError::Usage(":g <group> <text>"))),
            (":help", Ok(Command::Help)),
            (":all", Ok(Command::Help)),
            (":olu", Ok(Command::Online)),
            (":pu al", Ok(Command::OnlinePrefix(s("al")))),
            (":pu", Err(ParseError::Usage(":pu <prefix>"))),
            (":info", Ok(Command::Info)),
            (":q hello world", Ok(Command::Search(s("hello world")))),
            (
                ":q",
                Err(ParseError::Usage(
                    ":q <keyword> searches the history; :q! quits",
                )),
            ),
            (":q!", Ok(Command::Quit)),
            (":his", Ok(Command::History(None))),
            (":his bob", Ok(Command::History(Some(s("bob"))))),
            (":his a b", Err(ParseError::Usage(":his [user|group]"))),
            (
                ":delay 3 later",
                Ok(Command::Delay(
                    Duration::from_secs(3),
                    Target::All,
                    s("later"),
                )),
            ),
            (
                ":delay 1 @bob psst",
                Ok(Command::Delay(
                    Duration::from_secs(1),
                    Target::UserName(s("bob")),
                    s("psst"),
                )),
            ),
            (
                ":delay 1 :g rust hi",
                Ok(Command::Delay(
                    Duration::from_secs(1),
                    Target::Group(s("rust")),
                    s("hi"),
                )),
            ),
            (":delay 1 :olu", Err(ParseError::Unknown(s(":olu")))),
            (
                ":delay x hi",
                Err(ParseError::Usage(":delay <seconds> <message>")),
            ),
            (
                ":delay 5",
                Err(ParseError::Usage(":delay <seconds> <message>")),
            ),
            (":join rust", Ok(Command::Join(s("rust")))),
            (":leave rust", Ok(Command::Leave(s("rust")))),
            (":create rust", Ok(Command::Create(s("rust")))),
            (":create", Err(ParseError::Usage(":create <group>"))),
            (":groups", Ok(Command::Groups)),
            (":nope secret text", Err(ParseError::Unknown(s(":nope")))),
            (":", Err(ParseError::Unknown(s(":")))),
        ];
        for (line, want) in table {
            assert_eq!(parse(line), want, "{line:?}");
        }
    }

    #[test]
    fn targets_round_trip_through_their_line() {
        for (target, text) in [
            (Target::All, "@not a user, :not a command"),
            (Target::Group("rust".into()), "hi  there"),
            (Target::UserName("bob".into()), ":g x"),
            (Target::UserId(42), "hi"),
        ] {
            assert_eq!(
                parse(&target.line(text)),
                Ok(Command::Say(target.clone(), text.to_owned())),
                "{target:?}"
            );
        }
    }

    #[test]
    fn help_lists_every_command() {
        let help = help();
        for (word, _) in COMMANDS {
            assert!(help.contains(word), "{word}");
        }
    }
}
