//! Caption sidecar files: reading without mangling, atomic saving, and the tag operations of bulk editing.

use crate::fsutil::write_atomic;
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// What the caption file of an image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptionStatus {
    /// No sidecar file.
    Missing,
    /// The file exists but holds only whitespace.
    Empty,
    /// Readable UTF-8 text.
    Ok,
    /// The bytes are not UTF-8; `text` shows them with U+FFFD where they could not be read.
    NotUtf8,
    /// The file exists but could not be read (permissions, I/O error).
    Unreadable,
}

/// The on-disk conventions of a caption file, kept so that saving does not change what the user did not edit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TextStyle {
    pub bom: bool,
    pub crlf: bool,
    /// The file ends with a line break. It is kept out of the text, so that text appended in the editor (or a
    /// tag added by a bulk edit) stays on the first line, the one kohya reads.
    pub final_newline: bool,
}

/// A caption as the editor sees it: text with `\n` line endings, plus how to write it back.
#[derive(Clone, Debug, PartialEq)]
pub struct Caption {
    pub text: String,
    pub status: CaptionStatus,
    pub style: TextStyle,
}

impl Caption {
    pub fn missing() -> Self {
        Caption {
            text: String::new(),
            status: CaptionStatus::Missing,
            style: TextStyle::default(),
        }
    }

    /// Whether this caption gives the image usable text for training.
    pub fn is_usable(&self) -> bool {
        matches!(self.status, CaptionStatus::Ok)
    }

    /// Reads a caption file. A missing file is not an error: it is a caption with status `Missing`.
    pub fn load(path: &Path) -> Self {
        match crate::fsutil::admit::read_bounded(path, crate::fsutil::admit::CAPTION) {
            Ok(bytes) => Self::from_bytes(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::missing(),
            Err(e) => Caption {
                text: format!("(cannot read caption: {e})"),
                status: CaptionStatus::Unreadable,
                style: TextStyle::default(),
            },
        }
    }

    pub fn from_bytes(bytes: &[u8]) -> Self {
        let bom = bytes.starts_with(UTF8_BOM);
        let body = if bom { &bytes[UTF8_BOM.len()..] } else { bytes };
        let (raw, utf8) = match std::str::from_utf8(body) {
            Ok(s) => (s.to_owned(), true),
            Err(_) => (String::from_utf8_lossy(body).into_owned(), false),
        };
        let crlf = raw.contains("\r\n");
        let mut text = raw.replace("\r\n", "\n");
        let final_newline = text.ends_with('\n');
        if final_newline {
            text.pop();
        }
        let status = if !utf8 {
            CaptionStatus::NotUtf8
        } else if text.trim().is_empty() {
            CaptionStatus::Empty
        } else {
            CaptionStatus::Ok
        };
        Caption {
            text,
            status,
            style: TextStyle {
                bom,
                crlf,
                final_newline,
            },
        }
    }

    /// The bytes this caption is saved as: its style's line endings and BOM, always UTF-8.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut text = self.text.clone();
        if self.style.final_newline && !text.is_empty() {
            text.push('\n');
        }
        let body = if self.style.crlf {
            text.replace('\n', "\r\n")
        } else {
            text
        };
        let mut out = Vec::with_capacity(body.len() + 3);
        if self.style.bom {
            out.extend_from_slice(UTF8_BOM);
        }
        out.extend_from_slice(body.as_bytes());
        out
    }

    /// Replaces the text (keeping the file's style) and writes it atomically.
    pub fn save(&mut self, path: &Path, text: &str) -> std::io::Result<()> {
        let mut next = self.clone();
        next.text = text.replace("\r\n", "\n");
        if self.style.final_newline && next.text.ends_with('\n') {
            next.text.pop();
        }
        write_atomic(path, &next.to_bytes())?;
        next.status = if next.text.trim().is_empty() {
            CaptionStatus::Empty
        } else {
            CaptionStatus::Ok
        };
        *self = next;
        Ok(())
    }
}

/// The comma-separated tags of a caption, trimmed, empty ones dropped.
pub fn split_tags(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|t| !t.is_empty())
}

fn join_tags<'a>(tags: impl IntoIterator<Item = &'a str>) -> String {
    tags.into_iter().collect::<Vec<_>>().join(", ")
}

/// Puts `trigger` first. A caption that already starts with it is unchanged; one that holds it as a later tag
/// has it moved to the front, so the trigger never appears twice.
pub fn add_trigger(text: &str, trigger: &str) -> String {
    let trigger = trigger.trim();
    if trigger.is_empty() || split_tags(text).next() == Some(trigger) {
        return text.to_owned();
    }
    let rest: Vec<&str> = split_tags(text).filter(|t| *t != trigger).collect();
    if rest.is_empty() {
        return trigger.to_owned();
    }
    format!("{trigger}, {}", join_tags(rest))
}

/// Plain-text find and replace (not a regular expression).
pub fn find_replace(text: &str, find: &str, replace: &str) -> String {
    if find.is_empty() {
        text.to_owned()
    } else {
        text.replace(find, replace)
    }
}

/// Removes every tag equal to `tag`; a caption without it is returned unchanged, formatting included.
pub fn remove_tag(text: &str, tag: &str) -> String {
    let tag = tag.trim();
    if !split_tags(text).any(|t| t == tag) {
        return text.to_owned();
    }
    join_tags(split_tags(text).filter(|t| *t != tag))
}

/// Whether the caption holds `tag` as one of its comma-separated tags.
pub fn has_tag(text: &str, tag: &str) -> bool {
    split_tags(text).any(|t| t == tag.trim())
}

/// Tag → number of captions holding it, most frequent first (ties by name).
pub fn tag_counts<'a>(captions: impl IntoIterator<Item = &'a str>) -> Vec<(String, usize)> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for caption in captions {
        let mut seen: Vec<&str> = split_tags(caption).collect();
        seen.sort_unstable();
        seen.dedup();
        for tag in seen {
            *counts.entry(tag).or_default() += 1;
        }
    }
    let mut out: Vec<(String, usize)> =
        counts.into_iter().map(|(t, n)| (t.to_owned(), n)).collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_bom_and_crlf_on_save() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        std::fs::write(&path, b"\xEF\xBB\xBFone,\r\ntwo").unwrap();
        let mut c = Caption::load(&path);
        assert_eq!(c.text, "one,\ntwo");
        assert_eq!(
            c.style,
            TextStyle {
                bom: true,
                crlf: true,
                final_newline: false,
            }
        );
        c.save(&path, "three\nfour").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"\xEF\xBB\xBFthree\r\nfour");
    }

    #[test]
    fn a_final_line_break_stays_out_of_the_text_and_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        std::fs::write(&path, b"cat, sitting\n").unwrap();
        let mut c = Caption::load(&path);
        assert_eq!(c.text, "cat, sitting", "appended text lands on line 1");
        c.save(&path, &format!("{}, red", c.text)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"cat, sitting, red\n");
        std::fs::write(&path, b"one\r\n").unwrap();
        let mut c = Caption::load(&path);
        c.save(&path, "two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two\r\n");
    }

    #[test]
    fn statuses() {
        assert_eq!(
            Caption::load(Path::new("/nonexistent/x.txt")).status,
            CaptionStatus::Missing
        );
        assert_eq!(Caption::from_bytes(b"  \n").status, CaptionStatus::Empty);
        let latin1 = Caption::from_bytes(b"caf\xE9");
        assert_eq!(latin1.status, CaptionStatus::NotUtf8);
        assert_eq!(latin1.text, "caf\u{FFFD}");
        assert!(Caption::from_bytes(b"a cat").is_usable());
    }

    #[test]
    fn trigger_is_added_once() {
        assert_eq!(add_trigger("cat, sitting", "ohwx"), "ohwx, cat, sitting");
        assert_eq!(add_trigger("ohwx, cat", "ohwx"), "ohwx, cat");
        assert_eq!(
            add_trigger("cat, ohwx, sitting", "ohwx"),
            "ohwx, cat, sitting"
        );
        assert_eq!(add_trigger("", "ohwx"), "ohwx");
        let once = add_trigger("a photo of a cat", "ohwx");
        assert_eq!(add_trigger(&once, "ohwx"), once);
    }

    #[test]
    fn tag_operations() {
        assert_eq!(remove_tag("a, b, c, b", "b"), "a, c");
        assert_eq!(remove_tag("a,b", "z"), "a,b");
        assert_eq!(
            find_replace("red cat, red", "red", "blue"),
            "blue cat, blue"
        );
        assert!(has_tag("a, long hair", "long hair"));
        assert!(!has_tag("a, long hair", "hair"));
        let counts = tag_counts(["a, b", "b, c, b", "b"]);
        assert_eq!(counts[0], ("b".to_owned(), 3));
        assert_eq!(counts[1], ("a".to_owned(), 1));
        assert_eq!(counts.len(), 3);
    }
}
