//! A LoRA file written by the training engine (not by `save_kohya` on a hand-made set, which lora_roundtrip.rs
//! covers) loads completely in diffusers and gives there what it gives in our models.
//!
//! `lora_engine.safetensors` is the final file of a short engine run on the tiny SD1 fixture model (the ignored
//! test `write_lora_engine_fixture` below): UNet attention, feed-forward and LoCon conv adapters (targets "all")
//! and a trained text encoder. tools/check_engine_lora.py loads it with diffusers' `load_lora_weights`, checks
//! that every module of the file got an adapter with the file's tensors and alpha/rank and nothing was left over
//! or warned about, cross-checks against the file merged by hand, and records the outputs
//! (`engine_reference.safetensors`) and the check (`engine_check.json`). The tests here read those; they never
//! run Python.
//!
//! Regenerating (tools/README.md, "Reference fixtures"): first
//! `cargo test --test engine_lora_diffusers -- --ignored write_lora_engine_fixture`, then
//! `.venv-ref/bin/python tools/check_engine_lora.py`.

mod common;

use common::engine::{config, dataset, finished, run};
use common::sd_tiny::{compare, fixture, max_abs, reference, with_lora};
use lora_studio::train::StartOptions;
use lora_studio::train::config::TrainConfig;
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const NAME: &str = "lora_engine";
const STEPS: u64 = 6;
/// kohya-style concept folder: 2 repeats of `IMAGES` images.
const CONCEPT: &str = "2_zk";
const IMAGES: u64 = 3;
const RANK: usize = 4;
const ALPHA: f32 = 2.0;
const CONV_RANK: usize = 2;
const CONV_ALPHA: f32 = 4.0;

fn engine_file() -> PathBuf {
    fixture("sd1").join(format!("{NAME}.safetensors"))
}

/// The run: every UNet target the engine has (attention, feed-forward, LoCon on the resnets and resamplers, with
/// their own rank and alpha) and the text encoder trained, at a learning rate high enough that the adapters (whose
/// `up` starts at zero) clearly move in a few steps. `network.dropout` stays 0: this fixture is about the file.
fn engine_config(data: &Path, out: &Path) -> TrainConfig {
    let name = format!("saving.output_name=\"{NAME}\"");
    let rank = format!("network.rank={RANK}");
    let alpha = format!("network.alpha={ALPHA:?}");
    let conv_rank = format!("network.conv_rank={CONV_RANK}");
    let conv_alpha = format!("network.conv_alpha={CONV_ALPHA:?}");
    config(
        data,
        out,
        STEPS,
        &[
            &name,
            "network.targets=\"all\"",
            &rank,
            &alpha,
            &conv_rank,
            &conv_alpha,
            "network.dropout=0.0",
            "training.train_text_encoder=true",
            "training.seed=20260101",
            "optimizer.lr=1e-2",
            "optimizer.lr_text_encoder=1e-2",
        ],
    )
}

/// Trains the tiny SD1 model with the engine and copies the final file to
/// `tests/fixtures/sd_tiny/sd1/lora_engine.safetensors`. Run tools/check_engine_lora.py after it.
#[test]
#[ignore = "writes the lora_engine fixture; run tools/check_engine_lora.py after it"]
fn write_lora_engine_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data.join(CONCEPT), IMAGES);
    let out = dir.path().join("out");
    let events = run(engine_config(&data, &out), StartOptions::default());
    assert_eq!(finished(&events), (STEPS, false));
    let dest = engine_file();
    std::fs::copy(out.join(format!("{NAME}.safetensors")), &dest).unwrap();
    let bytes = std::fs::read(&dest).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    println!(
        "wrote {} ({} bytes, {} tensors); now run .venv-ref/bin/python tools/check_engine_lora.py",
        dest.display(),
        bytes.len(),
        tensors.len()
    );
}

fn check_json() -> serde_json::Value {
    let path = fixture("sd1").join("engine_check.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The file's bytes and its metadata.
fn read_file(path: &Path) -> (Vec<u8>, BTreeMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap().into_iter().collect();
    (bytes, meta)
}

/// diffusers adapted exactly the modules of the engine's file, with no warning, and the file carries the kohya
/// metadata of the run; every adapter was trained (no `up` left at zero).
#[test]
fn engine_file_loads_completely_in_diffusers() {
    let path = engine_file();
    let (bytes, meta) = read_file(&path);
    let check = check_json();
    let sha = format!("{:x}", Sha256::digest(&bytes));
    assert_eq!(
        check["file_sha256"],
        sha,
        "engine_check.json is not about the committed {}: rerun tools/check_engine_lora.py",
        path.display()
    );

    // The modules, by kohya name, with their down/up/alpha.
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let mut modules: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for name in tensors.names() {
        let (module, part) = ["lora_down.weight", "lora_up.weight", "alpha"]
            .iter()
            .find_map(|p| Some((name.strip_suffix(&format!(".{p}"))?, *p)))
            .unwrap_or_else(|| panic!("{name} is not a kohya LoRA tensor"));
        modules.entry(module.to_owned()).or_default().insert(part);
    }
    assert!(
        modules.values().all(|parts| parts.len() == 3),
        "{modules:?}"
    );
    let unet = modules
        .keys()
        .filter(|m| m.starts_with("lora_unet_"))
        .count();
    let te = modules.keys().filter(|m| m.starts_with("lora_te_")).count();
    assert_eq!(unet + te, modules.len());

    let f32s = |name: &str| -> Vec<f32> {
        let v = tensors.tensor(name).unwrap();
        assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name}");
        v.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let (mut locon, mut linear) = (0, 0);
    for m in modules.keys() {
        let down = tensors.tensor(&format!("{m}.lora_down.weight")).unwrap();
        let alpha = f32s(&format!("{m}.alpha"))[0];
        let conv3 = down.shape().len() == 4 && down.shape()[2] == 3;
        let (rank, want_alpha) = if conv3 {
            locon += 1;
            (CONV_RANK, CONV_ALPHA)
        } else {
            linear += 1;
            (RANK, ALPHA)
        };
        assert_eq!((down.shape()[0], alpha), (rank, want_alpha), "{m}");
        let up = f32s(&format!("{m}.lora_up.weight"));
        let up_max = up.iter().fold(0f32, |a, x| a.max(x.abs()));
        assert!(
            up_max > 1e-3,
            "{m}: lora_up is still (about) zero: {up_max}"
        );
    }
    for wanted in [
        "to_q",
        "attn2_to_out_0",
        "ff_net_0_proj",
        "ff_net_2",
        "proj_in",
        "resnets_0_conv1",
        "resnets_1_conv2",
        "time_emb_proj",
        "conv_shortcut",
        "downsamplers_0_conv",
        "upsamplers_0_conv",
    ] {
        assert!(
            modules
                .keys()
                .any(|m| m.starts_with("lora_unet_") && m.ends_with(wanted)),
            "no UNet module …{wanted} in the engine's file"
        );
    }

    assert_eq!(check["file_modules"], modules.len(), "{check}");
    assert_eq!(check["diffusers_adapted"]["unet"], unet, "{check}");
    assert_eq!(check["diffusers_adapted"]["text_encoder"], te, "{check}");
    assert_eq!(check["left_over_modules"], serde_json::json!([]), "{check}");
    assert_eq!(
        check["diffusers_warnings"],
        serde_json::json!([]),
        "{check}"
    );
    assert_eq!(
        check["metadata_keys"],
        serde_json::json!(meta.keys().collect::<Vec<_>>())
    );

    // The metadata an engine run writes (src/train/run.rs `metadata`, src/lora/metadata.rs).
    let get = |k: &str| {
        meta.get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {k} in the engine's file"))
    };
    assert_eq!(get("ss_network_module"), "networks.lora");
    assert_eq!(get("ss_network_dim"), RANK.to_string());
    assert_eq!(get("ss_network_alpha"), format!("{ALPHA:?}"));
    assert_eq!(
        get("ss_network_args"),
        format!(r#"{{"conv_alpha":"{CONV_ALPHA:?}","conv_dim":"{CONV_RANK}"}}"#)
    );
    assert_eq!(get("ss_base_model_version"), "sd_v1");
    assert_eq!(get("ss_v2"), "False");
    assert_eq!(get("ss_output_name"), NAME);
    assert_eq!(get("modelspec.title"), NAME);
    assert_eq!(get("ss_steps"), STEPS.to_string());
    assert_eq!(get("ss_max_train_steps"), STEPS.to_string());
    assert_eq!(get("ss_seed"), "20260101");
    assert_eq!(get("ss_network_train_unet_only"), "False");
    assert_eq!(get("ss_network_dropout"), "0");
    assert_eq!(get("ss_resolution"), "(32, 32)");
    assert_eq!(get("ss_num_train_images"), (2 * IMAGES).to_string());
    assert_eq!(
        get("ss_dataset_dirs"),
        format!(r#"{{"{CONCEPT}":{{"img_count":{IMAGES},"n_repeats":2}}}}"#)
    );
    let tags: serde_json::Value = serde_json::from_str(get("ss_tag_frequency")).unwrap();
    assert_eq!(tags[CONCEPT]["zk"], IMAGES, "{tags}");
    assert_eq!(tags[CONCEPT]["red"], IMAGES, "{tags}");
    assert_eq!(get("modelspec.trigger_phrase"), "zk");
    // 6 steps over 3 batches an epoch: two whole epochs.
    assert_eq!(get("ss_epoch"), "2");
    for key in [
        "ss_training_started_at",
        "ss_training_finished_at",
        "ss_learning_rate",
        "ss_optimizer",
        "ss_sd_model_name",
        "modelspec.architecture",
        "modelspec.date",
    ] {
        assert!(!get(key).is_empty(), "{key} is empty");
    }
    println!(
        "{}: {} modules ({unet} UNet: {locon} LoCon 3x3 convs + {} linear/1x1; {te} text encoder), {} metadata \
         keys; diffusers adapted {} UNet + {} text-encoder modules, nothing left over, no warnings",
        path.display(),
        modules.len(),
        linear - te,
        meta.len(),
        check["diffusers_adapted"]["unet"],
        check["diffusers_adapted"]["text_encoder"],
    );
}

/// Our UNet (the file attached unmerged at weight 1) and text encoder (its deltas merged, as the pipeline does)
/// give what diffusers gives with the file loaded by `load_lora_weights`, and the trained LoRA changes both
/// outputs measurably.
#[test]
fn engine_file_on_our_models_matches_diffusers() {
    let r = reference("sd1");
    let expected = candle_core::safetensors::load(
        fixture("sd1").join("engine_reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let ours = with_lora("sd1", &engine_file(), &r);
    assert!(
        ours.report.unmatched.is_empty(),
        "our loader: unmatched {:?}",
        ours.report.unmatched
    );
    assert_eq!(ours.report.matched.len(), ours.set.modules.len());
    let unet_modules = ours
        .set
        .modules
        .keys()
        .filter(|k| k.starts_with("unet."))
        .count();
    assert_eq!(ours.unet_attached, unet_modules);
    let check = check_json();
    assert_eq!(check["diffusers_adapted"]["unet"], unet_modules);
    assert_eq!(
        check["diffusers_adapted"]["text_encoder"],
        ours.set.modules.len() - unet_modules
    );

    for (what, got, key, without) in [
        ("UNet", &ours.unet_out, "engine.unet_out", "unet.out"),
        (
            "text encoder",
            &ours.te_last,
            "engine.te_last",
            "te.last_hidden_state",
        ),
    ] {
        let (err, scale, change) = compare(got, &expected[key], &r[without]);
        let ours_change = max_abs(&(got - &r[without]).unwrap());
        println!(
            "sd1: {what} with lora_engine: max abs error vs diffusers {err:e} (output absmax {scale}); the LoRA \
             changes it by up to {change} in diffusers, {ours_change} in ours"
        );
        assert!(
            err <= 1e-4 * scale.max(1.0),
            "{what}: max abs error {err} (absmax {scale})"
        );
        assert!(
            change > 1e-2,
            "{what}: the trained LoRA barely changes the output ({change})"
        );
    }
}
