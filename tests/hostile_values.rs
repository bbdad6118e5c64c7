//! Hostile values, fed to the real binary: config keys (in a `--config` file and through `--set`) and flags of
//! `train`, `sample` and `dataset check` at NaN, infinities, 1e308, `u32::MAX`, `u64::MAX`, zero and negative
//! values, bucket sides the wrong way round, billions of repeats (kohya folder names and the project file) and
//! runs of billions of steps. Each must end quickly with a non-zero exit that names the key, flag, folder or
//! file and what it must be, and leave the output untouched (`sample --out` not written, no output folder made).

mod common;

use common::cli::{refused, run, s, snapshot};
use common::engine::{dataset, model};
use std::path::Path;

/// `train` on the tiny model and a small dataset, 2 steps at 32 px, with `args` after (a later `--set` wins).
fn train(data: &Path, out: &Path, args: &[&str]) -> common::cli::Outcome {
    let m = model();
    let mut all = vec![
        "train",
        "--model",
        s(&m),
        "--dataset",
        s(data),
        "--output",
        s(out),
        "--set",
        "training.steps=2",
        "--set",
        "dataset.resolution=32",
        "--set",
        "dataset.bucketing=false",
    ];
    all.extend_from_slice(args);
    run(&all)
}

#[test]
fn config_values_out_of_range_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, 2);
    let out = dir.path().join("out");
    let sets = [
        (
            "optimizer.max_grad_norm=nan",
            "`optimizer.max_grad_norm` is NaN",
        ),
        (
            "training.noise_offset=nan",
            "`training.noise_offset` is NaN",
        ),
        (
            "training.min_snr_gamma=inf",
            "`training.min_snr_gamma` is inf",
        ),
        ("optimizer.eps=-1e-8", "`optimizer.eps` is -1e-8"),
        ("network.alpha=1e308", "`network.alpha` is 1e308"),
        ("optimizer.lr=-inf", "`optimizer.lr` is -inf"),
        (
            "dataset.bucket_step=4294967295",
            "`dataset.bucket_step` is 4294967295",
        ),
        ("dataset.bucket_step=0", "`dataset.bucket_step` is 0"),
        (
            "dataset.max_bucket_side=4294967295",
            "`dataset.max_bucket_side` is 4294967295",
        ),
        (
            "dataset.resolution=4294967295",
            "`dataset.resolution` is 4294967295",
        ),
        ("training.batch_size=0", "`training.batch_size` is 0"),
        (
            "optimizer.gradient_accumulation=4294967295",
            "`optimizer.gradient_accumulation`",
        ),
        (
            "optimizer.warmup_steps=9223372036854775807",
            "`optimizer.warmup_steps`",
        ),
        ("network.dropout=0.95", "`network.dropout` is 0.95"),
        ("model.clip_skip=12", "`model.clip_skip` is 12"),
        // Beyond TOML's 64-bit integers.
        (
            "training.seed=18446744073709551615",
            "`training.seed` is 18446744073709551615",
        ),
    ];
    for (set, needle) in sets {
        let o = train(&data, &out, &["--set", set]);
        refused(&o, &[needle]);
        assert!(!out.exists(), "{set}: the output folder was made");
    }
    let o = train(
        &data,
        &out,
        &[
            "--set",
            "dataset.bucketing=true",
            "--set",
            "dataset.min_bucket_side=2048",
            "--set",
            "dataset.max_bucket_side=1024",
        ],
    );
    refused(
        &o,
        &["`dataset.min_bucket_side` (2048) is above `dataset.max_bucket_side`"],
    );
    // The same through a config file, prompts included: the message names the prompt's index.
    let file = dir.path().join("run.toml");
    std::fs::write(
        &file,
        "[[sampling.prompts]]\nprompt = \"zk\"\n[[sampling.prompts]]\nprompt = \"zk\"\ncfg = nan\n",
    )
    .unwrap();
    let o = train(&data, &out, &["--config", s(&file)]);
    refused(
        &o,
        &["`sampling.prompts[1].cfg` is NaN", "a number from 0 to 30"],
    );
    std::fs::write(&file, "[dataset]\nbucket_step = 4294967295\n").unwrap();
    let o = train(&data, &out, &["--config", s(&file)]);
    refused(
        &o,
        &["`dataset.bucket_step` is 4294967295", "a multiple of 8"],
    );
    assert!(!out.exists());
}

#[test]
fn flags_out_of_range_are_refused_before_anything_loads() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, 2);
    let out = dir.path().join("out");
    for (flag, value) in [
        ("--resolution", "4294967295"),
        ("--steps", "18446744073709551615"),
        ("--batch-size", "0"),
        ("--rank", "4294967295"),
        ("--lr", "nan"),
        ("--alpha", "inf"),
        ("--seed", "18446744073709551615"),
        ("--save-every", "18446744073709551615"),
        ("--reg-repeats", "0"),
        ("--prior-loss-weight", "nan"),
        ("--prior-loss-weight", "11"),
    ] {
        let o = train(&data, &out, &[flag, value]);
        refused(&o, &[flag, "it must be"]);
        assert!(!out.exists(), "{flag} {value}: the output folder was made");
    }
    for (flag, value) in [
        ("--resolution", "4294967295"),
        ("--max-side", "4294967295"),
        ("--min-side", "4294967295"),
        ("--step", "4294967295"),
        ("--step", "0"),
        ("--batch-size", "0"),
    ] {
        let o = run(&["dataset", "check", s(&data), flag, value]);
        refused(&o, &[flag, "it must be"]);
    }
    let before = snapshot(&data);
    let m = model();
    let png = dir.path().join("out.png");
    for (flag, value, needle) in [
        ("--steps", "18446744073709551615", "--steps"),
        ("--steps", "0", "--steps"),
        ("--width", "4294967296000", "--width"),
        ("--height", "100000", "--height"),
        ("--width", "500", "a multiple of 8"),
        ("--cfg", "nan", "--cfg"),
        ("--cfg", "inf", "--cfg"),
        ("--lora-weight", "nan", "--lora-weight"),
        ("--lora", "x.safetensors:nan", "the weight after `:`"),
        ("--lora", "x.safetensors:1e308", "the weight after `:`"),
        ("--clip-skip", "7", "--clip-skip"),
        ("--seed", "18446744073709551615", "--seed"),
    ] {
        let o = run(&[
            "sample",
            "--model",
            s(&m),
            "--prompt",
            "zk",
            "--out",
            s(&png),
            flag,
            value,
        ]);
        refused(&o, &[needle, "it must be"]);
        assert!(!png.exists(), "{flag} {value}: --out was written");
    }
    assert_eq!(snapshot(&data), before);
}

#[test]
fn billions_of_repeats_or_steps_are_refused_naming_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // A kohya folder name.
    let data = dir.path().join("kohya");
    dataset(&data.join("4000000000_zk"), 2);
    let o = run(&["dataset", "check", s(&data)]);
    refused(
        &o,
        &["4000000000_zk", "4000000000 repeats", "at most 10000"],
    );
    let o = train(&data, &out, &[]);
    refused(&o, &["4000000000_zk", "at most 10000"]);
    assert!(!out.exists());
    // Beyond u32 and u64 the message still shows the folder's own number.
    let data = dir.path().join("huge");
    dataset(&data.join("99999999999999999999999_zk"), 1);
    let o = run(&["dataset", "check", s(&data)]);
    refused(&o, &["asks for 99999999999999999999999 repeats"]);
    // The project file.
    let data = dir.path().join("project");
    dataset(&data.join("cats"), 2);
    let project = data.join("lora-studio.toml");
    std::fs::write(
        &project,
        "schema = 1\ncaption_extension = \".txt\"\n[repeats]\ncats = 4000000000\n",
    )
    .unwrap();
    let o = run(&["dataset", "check", s(&data)]);
    refused(
        &o,
        &[s(&project), "\"cats\" is 4000000000", "from 1 to 10000"],
    );
    let o = train(&data, &out, &[]);
    refused(&o, &[s(&project), "from 1 to 10000"]);
    // Allowed repeats and epochs whose product is a run of billions of steps.
    let data = dir.path().join("epochs");
    dataset(&data.join("10000_zk"), 2);
    let o = train(
        &data,
        &out,
        &[
            "--set",
            "training.steps=0",
            "--set",
            "training.epochs=1000000",
        ],
    );
    refused(&o, &["20000000000 steps", "training.epochs"]);
    assert!(!out.join("state").exists());
}
