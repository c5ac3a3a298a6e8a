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
    /// `:his [user|group] [count]`: the server's recent history (of `all` without an
    /// argument), the last `count` messages (default [`HISTORY_DEFAULT`]).
    History(Option<String>, u32),
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
    /// `/help`, `/quit`, ...: a command typed the way other chat programs spell it. Not
    /// sent to everyone.
    #[error("commands start with ':' here: did you mean {0}? (not sent)")]
    Slash(String),
}

/// Messages `:his` shows without a count, and the most it can show (the route's limit).
pub const HISTORY_DEFAULT: u32 = 20;
pub const HISTORY_MAX: u32 = 100;

/// Every command: its word, its arguments, what it does. For help and tab completion.
pub const COMMANDS: &[(&str, &str, &str)] = &[
    (":help", "", "this list"),
    (":olu", "", "online users"),
    (
        ":pu",
        "<prefix>",
        "online users whose name starts with <prefix>",
    ),
    (
        ":info",
        "",
        "who and where you are, unsent and delayed messages",
    ),
    (":q", "<keyword>", "search the local history"),
    (
        ":his",
        "[user|group] [count]",
        "recent history from the server (default: all, 20)",
    ),
    (
        ":delay",
        "<seconds> <message>",
        "send later (plain, @user or :g)",
    ),
    (
        ":g",
        "<group> <text>",
        "post to a group (:g all, or :all, for all)",
    ),
    (":create", "<group>", "create a group and join it"),
    (":join", "<group>", "join a group"),
    (":leave", "<group>", "leave a group"),
    (":groups", "", "your groups"),
    (":q!", "", "save and quit (also Ctrl-D)"),
];

/// The help text, in aligned columns.
pub fn help() -> String {
    let mut out =
        String::from("Type text to say it in `all`; `@name text` (or `@<id> text`) to one user.\n");
    let width = COMMANDS
        .iter()
        .map(|(word, args, _)| usage_of(word, args).chars().count())
        .max()
        .unwrap_or(0);
    for (word, args, what) in COMMANDS {
        let usage = usage_of(word, args);
        out.push_str(&format!("  {usage:<width$}  {what}\n"));
    }
    out.push_str("Ctrl-C clears the line; :q! or Ctrl-D quits.");
    out
}

fn usage_of(word: &str, args: &str) -> String {
    if args.is_empty() {
        word.to_owned()
    } else {
        format!("{word} {args}")
    }
}

const MAX_DELAY_SECS: u64 = 24 * 3600;

pub fn parse(line: &str) -> Result<Command, ParseError> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(Command::Nothing);
    }
    if let Some(word) = slash_command(line) {
        return Err(ParseError::Slash(word));
    }
    if !line.starts_with(':') {
        return parse_message(line).map(|(target, text)| Command::Say(target, text));
    }
    let (word, rest) = split_word(line);
    // A command that takes nothing refuses words after it rather than drop them.
    let alone = |command: Command, usage: &'static str| {
        if rest.is_empty() {
            Ok(command)
        } else {
            Err(ParseError::Usage(usage))
        }
    };
    match word {
        ":help" | ":h" | ":?" => alone(Command::Help, ":help"),
        ":all" if rest.is_empty() => Err(ParseError::Usage(
            ":all <text> (plain text goes to all too; :help lists the commands)",
        )),
        ":all" => Ok(Command::Say(Target::All, rest.to_owned())),
        ":olu" => alone(Command::Online, ":olu (:pu <prefix> filters by name)"),
        ":pu" => one_word(rest, ":pu <prefix>").map(Command::OnlinePrefix),
        ":info" => alone(Command::Info, ":info"),
        ":q" if rest.is_empty() => Err(ParseError::Usage(
            ":q <keyword> searches the history; :q! quits",
        )),
        ":q" => Ok(Command::Search(rest.to_owned())),
        ":q!" | ":quit" | ":exit" => alone(Command::Quit, ":q!"),
        ":his" | ":history" => parse_history(rest),
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
        ":groups" => alone(Command::Groups, ":groups"),
        other => Err(ParseError::Unknown(other.to_owned())),
    }
}

/// `:his`, `:his bob`, `:his all 50`, `:his rust 5`.
fn parse_history(rest: &str) -> Result<Command, ParseError> {
    const USAGE: &str = ":his [user|group] [count] (count 1 to 100)";
    let words: Vec<&str> = rest.split_whitespace().collect();
    let count = |word: &str| {
        word.parse::<u32>()
            .ok()
            .filter(|n| (1..=HISTORY_MAX).contains(n))
            .ok_or(ParseError::Usage(USAGE))
    };
    match words.as_slice() {
        [] => Ok(Command::History(None, HISTORY_DEFAULT)),
        [of] => Ok(Command::History(Some((*of).to_owned()), HISTORY_DEFAULT)),
        [of, n] => Ok(Command::History(Some((*of).to_owned()), count(n)?)),
        _ => Err(ParseError::Usage(USAGE)),
    }
}

/// `/help`, `/quit`, `/join rust`: a command word of ours behind a slash, as IRC and
/// other chats spell commands. The `:` spelling it meant, if so.
fn slash_command(line: &str) -> Option<String> {
    let (word, _) = split_word(line);
    let name = word.strip_prefix('/')?;
    let known = |w: &str| {
        COMMANDS
            .iter()
            .any(|(c, _, _)| c.strip_prefix(':') == Some(w))
    };
    if known(name)
        || matches!(
            name,
            "quit" | "exit" | "h" | "?" | "history" | "msg" | "all"
        )
    {
        let meant = match name {
            "quit" | "exit" => "q!",
            "h" | "?" => "help",
            "history" => "his",
            "msg" => return Some("@name <text>".to_owned()),
            other => other,
        };
        return Some(format!(":{meant}"));
    }
    None
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
            (":help me", Err(ParseError::Usage(":help"))),
            (
                ":all",
                Err(ParseError::Usage(
                    ":all <text> (plain text goes to all too; :help lists the commands)",
                )),
            ),
            (":all hello", say(Target::All, "hello")),
            ("/help", Err(ParseError::Slash(s(":help")))),
            ("/quit", Err(ParseError::Slash(s(":q!")))),
            ("/join rust", Err(ParseError::Slash(s(":join")))),
            ("/shrug ok", say(Target::All, "/shrug ok")),
            ("1/2 done", say(Target::All, "1/2 done")),
            (":olu", Ok(Command::Online)),
            (
                ":olu now",
                Err(ParseError::Usage(":olu (:pu <prefix> filters by name)")),
            ),
            (":q! now", Err(ParseError::Usage(":q!"))),
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
            (":his", Ok(Command::History(None, 20))),
            (":his bob", Ok(Command::History(Some(s("bob")), 20))),
            (":his all 50", Ok(Command::History(Some(s("all")), 50))),
            (
                ":his a b",
                Err(ParseError::Usage(
                    ":his [user|group] [count] (count 1 to 100)",
                )),
            ),
            (
                ":his all 500",
                Err(ParseError::Usage(
                    ":his [user|group] [count] (count 1 to 100)",
                )),
            ),
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
    fn help_lists_every_command_in_aligned_columns() {
        let help = help();
        for (word, _, _) in COMMANDS {
            assert!(help.contains(word), "{word}");
        }
        // Every description starts in the same column.
        let columns: std::collections::BTreeSet<usize> = COMMANDS
            .iter()
            .map(|(_, _, what)| {
                let line = help.lines().find(|l| l.ends_with(what)).expect("listed");
                line.chars().count() - what.chars().count()
            })
            .collect();
        assert_eq!(columns.len(), 1, "{help}");
    }
}
