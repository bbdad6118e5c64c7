//! File-system helpers shared by every part that reads or writes user data.

pub mod admit;

use std::io::Write;
use std::path::{Path, PathBuf};

/// Names of the temporary files [`write_atomic`] makes and the staging folders of a training-state save.
const TEMP_FILE_PREFIX: &str = ".lora-studio-";
pub const STATE_STAGING_PREFIX: &str = ".state-";

/// Writes `bytes` to `path` atomically: a temporary file in the same folder is written, flushed to disk and
/// renamed over the target, so a crash leaves either the old file or the new one, never half of one.
/// A path that exists and is not a regular file (a device, a pipe, a folder) is refused.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    admit::writable_target(path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_FILE_PREFIX)
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    match std::fs::metadata(path) {
        // Keep the permissions of the file we replace (a temp file is created 0600).
        Ok(meta) => tmp.as_file().set_permissions(meta.permissions())?,
        // A new file gets what a plain create would give, so other programs (ComfyUI under another
        // account) can read a saved LoRA.
        Err(_) => set_default_permissions(tmp.as_file())?,
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Removes what an interrupted save left in `dir` (temporary files of [`write_atomic`], staging folders of a
/// training-state save) and returns their paths. Called when a run starts in its output folder: nothing of ours
/// writes there then, and a save that was cut off cannot be completed, only redone.
pub fn remove_stale_temps(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        let gone = if kind.is_file() && name.starts_with(TEMP_FILE_PREFIX) && name.ends_with(".tmp")
        {
            std::fs::remove_file(&path).is_ok()
        } else if kind.is_dir() && name.starts_with(STATE_STAGING_PREFIX) {
            std::fs::remove_dir_all(&path).is_ok()
        } else {
            false
        };
        if gone {
            removed.push(path);
        }
    }
    removed.sort();
    removed
}

#[cfg(unix)]
fn set_default_permissions(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
}

#[cfg(not(unix))]
fn set_default_permissions(_file: &std::fs::File) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        write_atomic(&file, b"one").unwrap();
        write_atomic(&file, b"two").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.txt")]);
        std::fs::write(dir.path().join(".lora-studio-x.tmp"), b"half").unwrap();
        std::fs::create_dir(dir.path().join(".state-abc")).unwrap();
        std::fs::write(dir.path().join(".state-abc/adapters.safetensors"), b"").unwrap();
        assert_eq!(remove_stale_temps(dir.path()).len(), 2);
        assert!(dir.path().join("a.txt").is_file(), "user files stay");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o777,
                0o644,
                "new files are readable by other programs"
            );
        }
    }
}
