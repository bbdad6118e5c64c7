//! The one place where user files are let in. A path the user typed may be a named pipe (a read blocks forever),
//! a device like `/dev/zero` (a read never ends), a folder, a broken link or a file far larger than its format
//! can be; each is refused before it is opened, with a reason that says what to do. The errors carry no path:
//! every caller already names the file it was reading.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::path::Path;

/// A kind of user file and the largest size it can sensibly have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileKind {
    /// What the file is, for messages ("a caption file").
    pub name: &'static str,
    pub max_bytes: u64,
}

/// A caption sidecar: the text encoder reads a few hundred tokens of it at most.
pub const CAPTION: FileKind = FileKind {
    name: "a caption file",
    max_bytes: 1 << 20,
};
/// `lora-studio.toml`, a `--config` file, a preset, a training state's `state.toml`.
pub const TOML: FileKind = FileKind {
    name: "a TOML settings file",
    max_bytes: 16 << 20,
};
/// A kohya_ss GUI config (JSON) or an sd-scripts `--config_file` (TOML) being imported: a few KB of settings.
pub const KOHYA_CONFIG: FileKind = FileKind {
    name: "a kohya_ss or sd-scripts config",
    max_bytes: 16 << 20,
};
/// An sd-scripts sample prompt file (`--sample_prompts`): one prompt a line.
pub const PROMPTS: FileKind = FileKind {
    name: "a sample prompt file",
    max_bytes: 1 << 20,
};
/// A diffusers `config.json`, `model_index.json`, a shard index or tokenizer vocabulary.
pub const JSON: FileKind = FileKind {
    name: "a JSON config file",
    max_bytes: 64 << 20,
};
/// An image of the dataset (decoding has its own pixel limits on top).
pub const IMAGE: FileKind = FileKind {
    name: "an image file",
    max_bytes: 1 << 30,
};
/// A LoRA adapter file, read whole (a full-rank SD LoRA is a few GB).
pub const LORA: FileKind = FileKind {
    name: "a LoRA file",
    max_bytes: 8 << 30,
};
/// A memory-mapped `.safetensors` file (checkpoint, VAE, state tensors, latents): its header is bounded where
/// it is parsed, the data is never copied whole.
pub const SAFETENSORS: FileKind = FileKind {
    name: "a safetensors file",
    max_bytes: u64::MAX,
};

/// Checks that `path` is a regular file (following links) no larger than `kind` allows; returns its metadata.
/// A missing file keeps [`io::ErrorKind::NotFound`] so callers can treat "absent" as a normal case.
pub fn regular_file(path: &Path, kind: FileKind) -> io::Result<Metadata> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found(path)),
        Err(e) => return Err(e),
    };
    check_kind(&meta, kind)?;
    Ok(meta)
}

/// Opens `path` for reading after [`regular_file`], and checks the opened file again (it may have been
/// swapped between the two looks).
pub fn open_regular(path: &Path, kind: FileKind) -> io::Result<File> {
    regular_file(path, kind)?;
    let file = File::open(path)?;
    check_kind(&file.metadata()?, kind)?;
    Ok(file)
}

/// The whole file, at most `kind.max_bytes` of it (reading stops there even if the size the system reports
/// was wrong).
pub fn read_bounded(path: &Path, kind: FileKind) -> io::Result<Vec<u8>> {
    let file = open_regular(path, kind)?;
    let mut bytes = Vec::new();
    file.take(kind.max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > kind.max_bytes {
        return Err(too_large(bytes.len() as u64, kind));
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_text(path: &Path, kind: FileKind) -> io::Result<String> {
    String::from_utf8(read_bounded(path, kind)?).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "it is not UTF-8 text (byte {} is not valid): save it as UTF-8",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Refuses a path that exists and is anything but a regular file, before something is written there
/// (`sample --out /dev/null` must not replace a device). A missing path is fine: it will be created.
pub fn writable_target(path: &Path) -> io::Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(meta) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "it is {}, not a file: give the path of a file to write, such as out.png",
                what_it_is(&meta)
            ),
        )),
        Err(_) if is_broken_link(path) => Err(not_found(path)),
        Err(_) => Ok(()),
    }
}

fn check_kind(meta: &Metadata, kind: FileKind) -> io::Result<()> {
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "it is {}, not a regular file; {} must be a plain file: replace it or choose another path",
                what_it_is(meta),
                kind.name
            ),
        ));
    }
    if meta.len() > kind.max_bytes {
        return Err(too_large(meta.len(), kind));
    }
    Ok(())
}

fn too_large(len: u64, kind: FileKind) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "it is {} MB, more than {} can be ({} MB): check that it is the right file",
            len.div_ceil(1 << 20),
            kind.name,
            kind.max_bytes >> 20
        ),
    )
}

fn is_broken_link(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
        && std::fs::metadata(path).is_err()
}

/// NotFound, saying whether the path is a link whose target is gone.
fn not_found(path: &Path) -> io::Error {
    let text = if is_broken_link(path) {
        let target = std::fs::read_link(path).unwrap_or_default();
        format!(
            "it is a link to {}, which does not exist: fix the link or choose the file it should point to",
            target.display()
        )
    } else {
        "it does not exist: check the path".to_owned()
    };
    io::Error::new(io::ErrorKind::NotFound, text)
}

fn what_it_is(meta: &Metadata) -> &'static str {
    if meta.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a named pipe (FIFO)";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_plain_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_bounded(dir.path(), CAPTION).unwrap_err().to_string();
        assert!(
            err.contains("a folder") && err.contains("choose another path"),
            "{err}"
        );
        let missing = dir.path().join("none.txt");
        assert_eq!(
            read_bounded(&missing, CAPTION).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        let big = dir.path().join("big.txt");
        std::fs::write(&big, vec![b'a'; (CAPTION.max_bytes + 1) as usize]).unwrap();
        let err = read_bounded(&big, CAPTION).unwrap_err().to_string();
        assert!(err.contains("more than a caption file can be"), "{err}");
        std::fs::write(&big, b"ok").unwrap();
        assert_eq!(read_text(&big, CAPTION).unwrap(), "ok");
        assert!(writable_target(&big).is_ok() && writable_target(&missing).is_ok());
        assert!(writable_target(dir.path()).is_err());
        #[cfg(unix)]
        {
            let link = dir.path().join("link.txt");
            std::os::unix::fs::symlink(&missing, &link).unwrap();
            let err = read_bounded(&link, CAPTION).unwrap_err().to_string();
            assert!(
                err.contains("none.txt") && err.contains("fix the link"),
                "{err}"
            );
            let err = read_bounded(Path::new("/dev/zero"), CAPTION).unwrap_err();
            assert!(err.to_string().contains("character device"), "{err}");
            assert!(writable_target(Path::new("/dev/null")).is_err());
        }
    }
}
