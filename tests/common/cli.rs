//! Driving the release binary as a user would, for the hostile-input suites: each run is killed after a time
//! limit, and a refusal must be a clean non-zero exit naming what to fix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a refusal may take (the debug binary on a 2-core CI machine).
pub const LIMIT: Duration = Duration::from_secs(30);

pub struct Outcome {
    pub code: Option<i32>,
    pub text: String,
}

/// Runs the binary with `args`, killing it after [`LIMIT`]; stdout and stderr go to files so a full pipe cannot
/// stall it.
pub fn run(args: &[&str]) -> Outcome {
    let logs = tempfile::tempdir().unwrap();
    let (out, err) = (logs.path().join("out"), logs.path().join("err"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_lora-studio"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > LIMIT {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "`lora-studio {}` did not end within {LIMIT:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&out).unwrap() + &std::fs::read_to_string(&err).unwrap();
    Outcome {
        code: status.code(),
        text,
    }
}

/// A refusal: non-zero (and not a panic's 101), no panic text, every `needle` in the message.
pub fn refused(o: &Outcome, needles: &[&str]) {
    assert!(!o.text.contains("panicked"), "panicked:\n{}", o.text);
    assert!(
        o.code.is_some_and(|c| c != 0 && c != 101),
        "exit {:?}:\n{}",
        o.code,
        o.text
    );
    for n in needles {
        assert!(o.text.contains(n), "`{n}` missing from:\n{}", o.text);
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Names, sizes and modification times of everything under `dir` (empty if it does not exist).
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let meta = e.metadata().unwrap();
        if meta.is_dir() {
            out.extend(snapshot(&e.path()));
        }
        out.insert(e.path(), (meta.len(), meta.modified().unwrap()));
    }
    out
}
