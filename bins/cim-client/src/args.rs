//! Command-line flags.

use std::path::PathBuf;

use clap::Parser;

pub const AFTER_HELP: &str = "\
Interactive (stdin is a terminal): type text to say it in `all`, `@bob text` to one user,
`:help` for the commands. Tab completes commands and online user names.

Non-interactive (stdin is not a terminal, or --send / --batch): every stdin line is handled
as if typed; received messages are printed on stdout as JSON lines
  {\"conv\":\"all\",\"seq\":3,\"sender\":7,\"senderName\":\"bob\",\"text\":\"hi\",\"at\":1700000000000}
command results as {\"command\":\"olu\",\"result\":...}, and status on stderr. After the end of
input the client waits (at most --drain-secs) until the server acknowledged every message.

State: the user id, resume token, unsent messages and read positions live in
$XDG_DATA_HOME/cim/<route>/<user>.json (default ~/.local/share/cim/...), with the local
history (<user>.history.jsonl) and line history (<user>.lines) beside it. The file is
saved on every send and on exit, readable by its owner only. The password is never stored
unless --save-password is given (then it is in that file as plain text).";

/// CIM's console chat client.
#[derive(Debug, Clone, Parser)]
#[command(name = "cim-client", version, after_help = AFTER_HELP)]
pub struct Args {
    /// The route's HTTP API: host:port or http://host:port.
    #[arg(long, env = "CIM_ROUTE", default_value = "127.0.0.1:8083")]
    pub route: String,
    /// Your user name. Registered on first use.
    #[arg(long, env = "CIM_USER")]
    pub user: String,
    /// Your user id, for an account registered elsewhere (otherwise it is remembered in
    /// the state file from registration on).
    #[arg(long, env = "CIM_USER_ID")]
    pub user_id: Option<u64>,
    /// Your password. Without it (and without a saved one) it is asked for without echo,
    /// or read from stdin's first line when stdin is not a terminal.
    #[arg(long, env = "CIM_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Keep the password in the state file (plain text, owner-only file) so later runs do
    /// not ask for it.
    #[arg(long)]
    pub save_password: bool,
    /// The state file [default: $XDG_DATA_HOME/cim/<route>/<user>.json].
    #[arg(long, env = "CIM_STATE")]
    pub state: Option<PathBuf>,
    /// Send this message line (plain, `@user text` or `:g group text`; repeatable), then
    /// exit once acknowledged. Implies non-interactive mode.
    #[arg(long)]
    pub send: Vec<String>,
    /// Non-interactive mode even when stdin is a terminal.
    #[arg(long)]
    pub batch: bool,
    /// After the end of input, how long to wait for acknowledgements, in seconds.
    #[arg(long, default_value_t = 10)]
    pub drain_secs: u64,
    /// No colours, even on a terminal (NO_COLOR is honoured too).
    #[arg(long)]
    pub no_color: bool,
}

/// `host:port` or `http://host:port[/]`.
pub fn parse_route(text: &str) -> Result<(String, u16), String> {
    let bare = text
        .strip_prefix("http://")
        .unwrap_or(text)
        .trim_end_matches('/');
    if bare.contains("://") {
        return Err(format!("--route {text:?}: only http:// is supported"));
    }
    let (host, port) = bare
        .rsplit_once(':')
        .ok_or_else(|| format!("--route {text:?}: expected host:port"))?;
    let port = port
        .parse()
        .map_err(|_| format!("--route {text:?}: bad port"))?;
    let host = host.trim_matches(['[', ']']);
    if host.is_empty() {
        return Err(format!("--route {text:?}: no host"));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse() {
        let ok = |h: &str, p| Ok((h.to_owned(), p));
        for (text, want) in [
            ("127.0.0.1:8083", ok("127.0.0.1", 8083)),
            ("http://127.0.0.1:8083", ok("127.0.0.1", 8083)),
            ("http://localhost:80/", ok("localhost", 80)),
            ("[::1]:80", ok("::1", 80)),
        ] {
            assert_eq!(parse_route(text), want, "{text}");
        }
        for bad in ["nohost", "https://a:1", ":80", "a:b", "a:99999"] {
            assert!(parse_route(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn help_is_complete() {
        use clap::CommandFactory;
        Args::command().debug_assert();
        let help = Args::command().render_long_help().to_string();
        for word in ["--route", "--user", "--send", "--state", "--save-password"] {
            assert!(help.contains(word), "{word} missing from --help");
        }
    }
}
