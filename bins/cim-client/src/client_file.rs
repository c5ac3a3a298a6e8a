//! The client's files: who the user is, the SDK's session state (resume token, outbox,
//! read positions), names seen, and a bounded local history of messages.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use cim_core::client::ClientState;
use cim_io::private_file;
use cim_io::sdk::state_file;
use serde::{Deserialize, Serialize};

const VERSION: u32 = 1;
/// Messages kept in the local history.
pub const HISTORY_CAP: usize = 2000;

/// The state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientFile {
    pub version: u32,
    pub route: String,
    pub user_id: u64,
    pub user_name: String,
    /// Only with `--save-password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// The SDK's state, in its own file format ([`state_file`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<serde_json::Value>,
    /// Names of users seen (id → name), to show senders and resolve `@name` offline.
    /// Valid for one store only: dropped when [`Self::last_epoch`] shows the store was
    /// reset (ids may then name other people).
    #[serde(default)]
    pub users: BTreeMap<u64, String>,
    /// The login epoch of the last session. A user's epoch only grows in one store, so a
    /// login answered with an epoch not above it means the store is not the one the names
    /// came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_epoch: Option<u64>,
    /// `:delay`ed messages not sent yet: they survive a quit or a crash and are sent at
    /// their time by the next run (at once if it is past).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delayed: Vec<PendingDelay>,
}

/// One `:delay`ed message waiting for its time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingDelay {
    /// Unique among the pending ones of this file.
    pub id: u64,
    /// When to send it, Unix milliseconds (wall time, so it means the same after a restart).
    pub due_at_ms: u64,
    /// The message as a line (`:g all text`, `@bob text`, `:g rust text`), parsed again when
    /// it is sent.
    pub line: String,
}

impl ClientFile {
    pub fn new(route: &str, user_id: u64, user_name: &str) -> Self {
        Self {
            version: VERSION,
            route: route.to_owned(),
            user_id,
            user_name: user_name.to_owned(),
            password: None,
            session: None,
            users: BTreeMap::new(),
            last_epoch: None,
            delayed: Vec::new(),
        }
    }

    /// Records a login's epoch. `true` when it shows the store was reset since the last
    /// one (the names seen are then dropped: they may belong to other people now).
    pub fn note_epoch(&mut self, epoch: u64) -> bool {
        let reset = self.last_epoch.is_some_and(|last| epoch <= last);
        if reset {
            self.users.clear();
        }
        self.last_epoch = Some(epoch);
        reset
    }

    pub fn session_state(&self) -> io::Result<Option<ClientState>> {
        match &self.session {
            None => Ok(None),
            Some(value) => state_file::from_json(&value.to_string()).map(Some),
        }
    }

    pub fn set_session(&mut self, state: &ClientState) {
        // `to_json` writes valid JSON, so this parse cannot fail; if it did, keeping the
        // previous session is better than none.
        if let Ok(value) = serde_json::from_str(&state_file::to_json(state)) {
            self.session = Some(value);
        }
    }
}

/// The default state file: `$XDG_DATA_HOME/cim/<route key>/<user>.json`, else
/// `~/.local/share/cim/...`, else the current directory. The route key is
/// [`RouteAddr::key`](cim_io::sdk::RouteAddr::key): one file for every spelling of one route
/// (`localhost:8083`, `http://127.0.0.1:8083/`).
/// Names are one account regardless of case (`Bob` is `bob`), so the file name is the
/// lower-case name.
pub fn default_path(route_key: &str, user: &str) -> PathBuf {
    data_dir()
        .join(sanitize(route_key))
        .join(format!("{}.json", sanitize(&user.to_lowercase())))
}

/// Where earlier versions kept the state file (keyed by the host as typed). Used when it
/// exists and the normalized one does not, so an upgrade keeps its account and outbox.
pub fn legacy_path(host: &str, port: u16, user: &str) -> PathBuf {
    data_dir()
        .join(sanitize(&format!("{host}_{port}")))
        .join(format!("{}.json", sanitize(user)))
}

/// State files of `user` for other routes that listen on `port` (another spelling of the
/// host, before keys were normalized, or a name for the same machine): `(path, user id)`.
/// On "name is taken" they tell the user which id to log in with.
pub fn same_user_elsewhere(port: u16, user: &str) -> Vec<(PathBuf, u64)> {
    let suffix = format!("_{port}");
    let Ok(dirs) = std::fs::read_dir(data_dir()) else {
        return Vec::new();
    };
    let mut found: Vec<(PathBuf, u64)> = dirs
        .filter_map(Result::ok)
        .filter(|d| d.file_name().to_string_lossy().ends_with(&suffix))
        .flat_map(|d| {
            [user.to_owned(), user.to_lowercase()]
                .map(|u| d.path().join(format!("{}.json", sanitize(&u))))
        })
        .filter_map(|path| {
            let file = load(&path).ok()??;
            file.user_name
                .eq_ignore_ascii_case(user)
                .then_some((path, file.user_id))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

fn data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".local").join("share"))
        })
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("cim")
}

/// A path component from any text.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A file beside the state file: `<stem>.<ext>`.
pub fn sibling(state: &Path, ext: &str) -> PathBuf {
    let stem = state.file_stem().unwrap_or_default().to_string_lossy();
    state.with_file_name(format!("{stem}.{ext}"))
}

pub fn load(path: &Path) -> io::Result<Option<ClientFile>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let file: ClientFile = serde_json::from_str(&text)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if file.version != VERSION {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown version {}", file.version),
                ));
            }
            Ok(Some(file))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes atomically and owner-only: it holds the resume token and maybe the password.
pub fn save(path: &Path, file: &ClientFile) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(file).map_err(io::Error::other)?;
    private_file::write_atomically(path, text.as_bytes())
}

/// One message as printed in non-interactive mode and kept in the local history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeenMessage {
    pub conv: String,
    pub seq: u64,
    pub sender: u64,
    pub sender_name: Option<String>,
    pub text: String,
    /// When the server stored it, Unix milliseconds.
    pub at: u64,
}

/// The last [`HISTORY_CAP`] messages seen, appended to a JSON-lines file as they come and
/// compacted when the file grows to twice the cap.
#[derive(Debug)]
pub struct LocalHistory {
    path: PathBuf,
    entries: VecDeque<SeenMessage>,
    lines_in_file: usize,
    cap: usize,
}

impl LocalHistory {
    /// Loads what is there; unreadable lines are skipped (it is only a convenience).
    pub fn load(path: PathBuf, cap: usize) -> Self {
        private_file::make_owner_only(&path);
        let mut entries = VecDeque::new();
        let mut lines_in_file = 0;
        if let Ok(file) = std::fs::File::open(&path) {
            for line in io::BufReader::new(file).lines().map_while(Result::ok) {
                lines_in_file += 1;
                if let Ok(entry) = serde_json::from_str(&line) {
                    entries.push_back(entry);
                    if entries.len() > cap {
                        entries.pop_front();
                    }
                }
            }
        }
        Self {
            path,
            entries,
            lines_in_file,
            cap,
        }
    }

    pub fn push(&mut self, message: SeenMessage) -> io::Result<()> {
        let line = serde_json::to_string(&message).map_err(io::Error::other)?;
        self.entries.push_back(message);
        if self.entries.len() > self.cap {
            self.entries.pop_front();
        }
        if self.lines_in_file + 1 >= self.cap * 2 {
            return self.compact();
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file =
            private_file::owner_only(std::fs::OpenOptions::new().create(true).append(true))
                .open(&self.path)?;
        writeln!(file, "{line}")?;
        self.lines_in_file += 1;
        Ok(())
    }

    /// Rewrites the file with the kept entries only.
    pub fn compact(&mut self) -> io::Result<()> {
        let mut text = String::new();
        for entry in &self.entries {
            text.push_str(&serde_json::to_string(entry).map_err(io::Error::other)?);
            text.push('\n');
        }
        private_file::write_atomically(&self.path, text.as_bytes())?;
        self.lines_in_file = self.entries.len();
        Ok(())
    }

    /// Entries whose text, sender name or conversation contains `keyword` (any case),
    /// oldest first, at most `limit` (the newest ones).
    pub fn search(&self, keyword: &str, limit: usize) -> Vec<SeenMessage> {
        let keyword = keyword.to_lowercase();
        let mut found: Vec<SeenMessage> = self
            .entries
            .iter()
            .rev()
            .filter(|m| {
                m.text.to_lowercase().contains(&keyword)
                    || m.conv.to_lowercase().contains(&keyword)
                    || m.sender_name
                        .as_deref()
                        .is_some_and(|n| n.to_lowercase().contains(&keyword))
            })
            .take(limit)
            .cloned()
            .collect();
        found.reverse();
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(seq: u64, text: &str) -> SeenMessage {
        SeenMessage {
            conv: "all".into(),
            seq,
            sender: 1,
            sender_name: Some("ann".into()),
            text: text.into(),
            at: 5,
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cim-client-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn history_is_bounded_searchable_and_survives_reload() {
        let dir = temp_dir("hist");
        let path = dir.join("u.history.jsonl");
        let mut history = LocalHistory::load(path.clone(), 3);
        for seq in 1..=10 {
            history.push(seen(seq, &format!("msg {seq}"))).unwrap();
        }
        assert_eq!(history.len(), 3);
        assert_eq!(history.search("MSG", 10).len(), 3);
        assert_eq!(history.search("msg 9", 10), vec![seen(9, "msg 9")]);
        assert_eq!(
            history.search("ann", 2),
            vec![seen(9, "msg 9"), seen(10, "msg 10")]
        );
        let reloaded = LocalHistory::load(path.clone(), 3);
        assert_eq!(reloaded.search("msg", 10), history.search("msg", 10));
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < 6, "file compacted, {lines} lines");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn state_file_round_trips_with_the_session() {
        let dir = temp_dir("state");
        let path = dir.join("sub").join("ann.json");
        assert!(load(&path).unwrap().is_none());
        let mut file = ClientFile::new("127.0.0.1:8083", 7, "ann");
        file.set_session(&ClientState::default());
        file.users.insert(8, "bob".into());
        let delay = PendingDelay {
            id: 1,
            due_at_ms: 1_700_000_000_000,
            line: "@bob later".into(),
        };
        file.delayed.push(delay.clone());
        save(&path, &file).unwrap();
        let back = load(&path).unwrap().unwrap();
        assert_eq!(back.user_id, 7);
        assert_eq!(back.users.get(&8).map(String::as_str), Some("bob"));
        assert_eq!(back.session_state().unwrap(), Some(ClientState::default()));
        assert_eq!(back.delayed, vec![delay]);
        assert!(!std::fs::read_to_string(&path).unwrap().contains("password"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn default_paths_are_per_route_and_user() {
        let path = default_path("127.0.0.1:8083", "A/b");
        assert!(path.ends_with("cim/127.0.0.1_8083/a_b.json"), "{path:?}");
        assert_eq!(sibling(&path, "lines").file_name().unwrap(), "a_b.lines");
        assert_eq!(
            legacy_path("localhost", 8083, "a"),
            data_dir().join("localhost_8083").join("a.json")
        );
    }

    #[test]
    fn a_lower_epoch_drops_the_names() {
        let mut file = ClientFile::new("r", 1, "ann");
        file.users.insert(2, "bob".into());
        assert!(!file.note_epoch(5), "first login");
        assert!(!file.note_epoch(6), "a later login");
        assert_eq!(file.users.len(), 1);
        // A store reset: the epoch counter starts over, and id 2 may be someone else.
        assert!(file.note_epoch(1));
        assert!(file.users.is_empty());
        assert!(!file.note_epoch(2));
    }

    #[cfg(unix)]
    #[test]
    fn the_local_history_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("mode");
        let path = dir.join("u.history.jsonl");
        std::fs::create_dir_all(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let mut history = LocalHistory::load(path.clone(), 3);
        history.push(seen(1, "private")).unwrap();
        assert_eq!(mode(&path), 0o600);
        history.compact().unwrap();
        assert_eq!(mode(&path), 0o600, "after compaction");
        // A file an older version left world-readable is fixed on load.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _ = LocalHistory::load(path.clone(), 3);
        assert_eq!(mode(&path), 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
