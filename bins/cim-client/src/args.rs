//! Command-line flags.

use std::path::PathBuf;

use clap::Parser;

pub const AFTER_HELP: &str = "\
Interactive (stdin is a terminal): type text to say it in `all`, `@bob text` to one user,
`:help` for the commands. Tab completes commands and online user names.

Non-interactive (stdin is not a terminal, or --send / --batch): every stdin line is handled
as if typed, once the session is online (lines read before are queued); received messages are printed on stdout as JSON lines
  {\"conv\":\"all\",\"seq\":3,\"sender\":7,\"senderName\":\"bob\",\"text\":\"hi\",\"at\":1700000000000}
command results as {\"command\":\"olu\",\"result\":...}, and status on stderr. After the end of
input the client waits (at most --drain-secs) until the server acknowledged every message.
Exit codes: 0 all done, 1 other error, 2 bad command line, 3 login rejected (wrong
password), 4 registration refused (name taken), 5 TLS cannot work (certificate not trusted,
or http:// vs https://), 6 route or servers unreachable (messages saved for the next run),
7 unknown recipient, 8 message too long, 9 bad input line or refused command, 10 message
rejected, 11 logged in elsewhere.

State: the user id, resume token, unsent messages and read positions live in
$XDG_DATA_HOME/cim/<route>/<user>.json (default ~/.local/share/cim/...; one per user and
route, however the route is spelled: localhost and 127.0.0.1 are one), with the local
history (<user>.history.jsonl), line history (<user>.lines) and diagnostics log
(<user>.log) beside it, all readable by their owner only. The password is never stored
unless --save-password is given (then it is in that file as plain text).";

/// CIM's console chat client.
#[derive(Debug, Clone, Parser)]
#[command(name = "cim-client", version, after_help = AFTER_HELP)]
pub struct Args {
    /// The route's API: host:port, http://host:port, or https://host:port (then the
    /// servers are reached over TLS too, and a plaintext one is refused).
    #[arg(long, env = "CIM_ROUTE", default_value = "127.0.0.1:8083")]
    pub route: String,
    /// PEM CA to trust for the route's and the servers' certificates, instead of the
    /// system's roots (e.g. the one `cim up --tls` prints). Host names are always checked.
    #[arg(long, env = "CIM_CA")]
    pub ca: Option<PathBuf>,
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
    /// Protocol details: diagnostics on stderr (RUST_LOG filters them) instead of the log
    /// file beside the state file, and codes, servers and epochs in messages.
    #[arg(long, short)]
    pub verbose: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

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
