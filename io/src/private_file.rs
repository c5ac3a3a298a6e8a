//! Files only their owner may read — resume tokens, saved passwords, private keys, chat
//! history — written so that a crash or a reader at the wrong moment never sees half of one.
//! The console client, the SDK's state file and the development CA all write through here.

use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes`: written to a fresh owner-only file beside it, synced, and
/// renamed over it (then the directory is synced, so the rename survives a power cut too).
/// A crash leaves the old contents or the new, never a torn file; a failure leaves no
/// temporary file behind.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temporary_beside(path);
    // The temporary is this process's own (two clients may share a state file: each
    // renames a whole file of its own, the last one wins, neither is torn). A stale one of
    // this process id (a crash mid-write) is removed, and the new one must be created, not
    // opened: whatever sat under that name cannot lend it its mode or redirect the write
    // through a link.
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut file = owner_only(OpenOptions::new().write(true).create_new(true)).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        sync_directory_of(path);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `options` creating files readable and writable by their owner only. An existing file
/// keeps its mode: [`make_owner_only`] fixes one an older version created.
pub fn owner_only(options: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options
}

/// Takes group and other permissions off an existing file (older versions created some
/// 0644). Best effort: a file that is not there or not ours is left as it is.
pub fn make_owner_only(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

fn temporary_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Best effort: not every file system lets a directory be opened and synced.
fn sync_directory_of(path: &Path) {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    #[cfg(unix)]
    fn writes_replace_whole_files_owner_only_and_leave_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomically(&path, b"one").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(mode(&path), 0o600);
        // A stale temporary of another mode (a crash, or someone else's file) is not reused.
        let tmp = temporary_beside(&path);
        std::fs::write(&tmp, b"stale").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(mode(&path), 0o600);
        assert!(!tmp.exists());
        // A failed write leaves the old file and no temporary.
        let missing = dir.path().join("no-such-dir/state.json");
        assert!(write_atomically(&missing, b"x").is_err());
        assert!(!temporary_beside(&missing).exists());
    }

    #[test]
    #[cfg(unix)]
    fn an_older_versions_readable_file_is_made_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        std::fs::write(&path, b"x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        make_owner_only(&path);
        assert_eq!(mode(&path), 0o600);
        make_owner_only(&dir.path().join("absent"));
    }
}
