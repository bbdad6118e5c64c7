//! `lora-studio dataset …` end to end: the real binary on real files.

mod common;

use serde_json::Value;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lora-studio"))
}

fn check_json(dir: &std::path::Path, extra: &[&str]) -> (Value, i32) {
    let out = bin()
        .args(["dataset", "check"])
        .arg(dir)
        .args(["--json"])
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)));
    (json, out.status.code().unwrap())
}

fn strings(v: &Value) -> Vec<String> {
    let mut s: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect();
    s.sort();
    s
}

#[test]
fn check_reports_every_problem_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = common::bad_dataset(dir.path());
    let (r, code) = check_json(dir.path(), &["--resolution", "512", "--batch-size", "2"]);
    assert_eq!(code, 0, "usable with warnings");
    // good0-3, no_caption, empty_caption, latin1, dup, small, alpha, deep, rotated
    assert_eq!(r["images"], 12);
    assert_eq!(r["files"], 16);
    assert_eq!(
        strings(&r["unreadable"]),
        [
            "style/corrupt.png",
            "style/notes.webp",
            "style/truncated.png",
            "style/zero.jpg"
        ]
        .map(|p| bad.path(p))
    );
    assert!(strings(&r["missing_caption"]).contains(&bad.path("10_subject/no_caption.jpg")));
    assert_eq!(
        strings(&r["empty_caption"]),
        [bad.path("style/empty_caption.png")]
    );
    assert_eq!(
        strings(&r["non_utf8_caption"]),
        [bad.path("style/latin1.png")]
    );
    assert_eq!(strings(&r["too_small"]), [bad.path("style/small.png")]);
    assert_eq!(strings(&r["transparent"]), [bad.path("style/alpha.png")]);
    assert_eq!(r["odd_mode"][0]["path"], bad.path("style/deep.png"));
    assert_eq!(strings(&r["exif_rotated"]), [bad.path("style/rotated.jpg")]);
    let dups = r["duplicates"].as_array().unwrap();
    assert_eq!(dups.len(), 1);
    assert_eq!(
        strings(&dups[0]),
        [
            bad.path("10_subject/good0.png"),
            bad.path("style/dup_of_good0.png")
        ]
    );
    assert_eq!(r["repeats"]["10_subject"], 10);
    assert_eq!(r["repeats"]["style"], 1);
    // 5 images ×10 repeats + 7 readable images ×1 in style/
    assert_eq!(r["images_per_epoch"], 57);
    let buckets = r["buckets"].as_object().unwrap();
    assert_eq!(
        buckets.values().map(|v| v.as_u64().unwrap()).sum::<u64>(),
        12
    );
    assert_eq!(
        buckets["576x448"], 6,
        "the four 640×512 good images, the copy of one, and the 100×80 one"
    );
    assert_eq!(
        buckets["448x576"], 2,
        "no_caption.jpg and the EXIF-rotated 640×512 photo"
    );
    let steps = r["steps_per_epoch"].as_u64().unwrap();
    assert!((57u64.div_ceil(2)..=57).contains(&steps), "{steps}");
    // Every unreadable file has a reason a person can act on.
    let problems = r["problems"].as_array().unwrap();
    let reason = |p: &str| {
        problems
            .iter()
            .find(|x| x["path"] == bad.path(p))
            .map(|x| x["problem"].as_str().unwrap().to_owned())
            .unwrap()
    };
    assert!(reason("style/zero.jpg").contains("empty"));
    assert!(reason("style/notes.webp").contains("not an image"));
}

#[test]
fn check_text_output_and_exit_code_when_nothing_is_trainable() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.png"), b"nope").unwrap();
    let out = bin()
        .args(["dataset", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Nothing here can be trained"), "{text}");
    let missing = bin()
        .args(["dataset", "check", "/no/such/folder"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("does not exist"));
}

#[test]
fn caption_tags_and_import_commands() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.png");
    common::write_png(&a, 64, 64, 1);
    common::caption(&a, b"red, smile");
    let run = |args: &[&str]| {
        let out = bin().args(args).arg(dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let _ = bin()
        .args(["dataset", "caption"])
        .arg(dir.path())
        .args(["--add-trigger", "ohwx", "--remove-tag", "smile"])
        .output()
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("a.txt")).unwrap(),
        "ohwx, red"
    );
    let tags: Value = serde_json::from_str(&run(&["dataset", "tags", "--json"])).unwrap();
    assert_eq!(tags["ohwx"], 1);

    let src = tempfile::tempdir().unwrap();
    common::write_png(&src.path().join("a.png"), 64, 64, 2); // same name, other content
    std::fs::copy(&a, src.path().join("copy.png")).unwrap(); // same content, other name
    let out = bin()
        .args(["dataset", "import"])
        .arg(dir.path())
        .arg(src.path().join("a.png"))
        .arg(src.path().join("copy.png"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Imported 1 images"));
    assert!(dir.path().join("a-1.png").is_file());
    assert!(!dir.path().join("copy.png").exists());
}

/// 10,000 files, some broken, a huge image, a symlink loop and an unreadable file: the check completes and
/// names every problem, and changes nothing on disk.
#[test]
fn survives_a_large_hostile_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let tiny = {
        let mut b = Vec::new();
        image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]))
            .write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
            .unwrap();
        b
    };
    for i in 0..9_990 {
        let sub = root.join(format!("part{}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&sub).unwrap();
        }
        let path = sub.join(format!("f{i}.png"));
        if i % 997 == 0 {
            std::fs::write(&path, &tiny[..tiny.len() / 2]).unwrap(); // truncated
        } else if i % 2 == 0 {
            std::fs::write(&path, &tiny).unwrap();
        } else {
            std::fs::write(path.with_extension("txt"), b"caption").unwrap();
        }
    }
    image::GrayImage::new(12_000, 12_000)
        .save(root.join("huge.png"))
        .unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(root, root.join("part0/loop")).unwrap();
    let locked = root.join("locked.png");
    std::fs::write(&locked, &tiny).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let before = listing(root);
    let (r, code) = check_json(root, &[]);
    assert_eq!(code, 0);
    let pngs = (0..9_990).filter(|i| i % 997 == 0 || i % 2 == 0).count();
    assert_eq!(r["files"], pngs + 2);
    let unreadable = strings(&r["unreadable"]);
    let truncated = (0..9_990).filter(|i| i % 997 == 0).count();
    let locked_readable = std::fs::read(&locked).is_ok(); // root reads anything
    assert_eq!(unreadable.len(), truncated + usize::from(!locked_readable));
    assert!(
        r["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["problem"].as_str().unwrap().contains("loop"))
    );
    assert!(
        !unreadable.contains(&root.join("huge.png").to_string_lossy().into_owned()),
        "a 12000² image is legal"
    );
    assert_eq!(listing(root), before, "a check never modifies the dataset");
}

fn listing(root: &std::path::Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e.path().to_string_lossy().into_owned(),
                e.metadata().map(|m| m.len()).unwrap_or(0),
            )
        })
        .collect();
    v.sort();
    v
}
