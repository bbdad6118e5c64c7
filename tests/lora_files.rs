//! LoRA files: the kohya and PEFT fixtures (made by diffusers, tests/fixtures/sd_tiny) load to the same updates,
//! saves round-trip with their metadata and kohya's hashes, and broken or foreign keys are reported.

mod common;

use common::sd_tiny::{fixture, fixture_json};

use candle_core::{DType, Device, Tensor};
use lora_studio::lora::{
    BaseModel, DatasetDir, LoraError, LoraMetadata, LoraModule, LoraSet, load, save_kohya,
};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

const FAMILIES: [&str; 2] = ["sd1", "sd2v"];

/// Every Linear/Conv of the tiny UNet (its 2-D and 4-D `*.weight` tensors), as `unet.<module path>`.
fn unet_module_paths(family: &str) -> BTreeSet<String> {
    let file = fixture(family).join("diffusers/unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(file).unwrap();
    let weights = SafeTensors::deserialize(&bytes).unwrap();
    weights
        .iter()
        .filter(|(_, view)| matches!(view.shape().len(), 2 | 4))
        .filter_map(|(name, _)| Some(format!("unet.{}", name.strip_suffix(".weight")?)))
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    d.max(0).unwrap().to_scalar().unwrap()
}

fn metadata() -> LoraMetadata {
    LoraMetadata {
        base_model: BaseModel::Sd1,
        network_dim: 4,
        network_alpha: 2.0,
        conv: None,
        output_name: "tiny".into(),
        training_started_at: UNIX_EPOCH + Duration::from_secs(1_764_000_000),
        saved_at: UNIX_EPOCH + Duration::from_secs(1_764_003_600),
        steps: 100,
        epoch: 2,
        learning_rate: 1e-4,
        resolution: (512, 512),
        num_train_images: 50,
        dataset_dirs: [(
            "5_tiny".to_string(),
            DatasetDir {
                n_repeats: 5,
                img_count: 10,
            },
        )]
        .into(),
        tag_frequency: [("5_tiny".to_string(), [("sks".to_string(), 10)].into())].into(),
        extra: BTreeMap::new(),
    }
}

fn file_metadata(path: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    header.metadata().clone().unwrap()
}

#[test]
fn kohya_and_peft_fixtures_give_the_same_updates() {
    for family in FAMILIES {
        let json = fixture_json(family);
        let modules = json["lora"]["modules"].as_array().unwrap();
        let paths = unet_module_paths(family);
        let dir = fixture(family);
        let (kohya, report) = load(&dir.join("lora_kohya.safetensors"), &paths).unwrap();
        let expected: Vec<String> = modules
            .iter()
            .map(|m| format!("unet.{}", m["module"].as_str().unwrap()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(report.matched, expected, "{family}");
        assert!(
            report.unmatched.is_empty(),
            "{family}: {:?}",
            report.unmatched
        );
        for m in modules {
            let module = &kohya.modules[&format!("unet.{}", m["module"].as_str().unwrap())];
            assert_eq!(module.alpha as f64, m["alpha"].as_f64().unwrap());
            assert_eq!(module.scale(), m["scale"].as_f64().unwrap());
            assert_eq!(serde_json::json!(module.down.dims()), m["down_shape"]);
            assert_eq!(serde_json::json!(module.up.dims()), m["up_shape"]);
        }
        let expected_metadata: BTreeMap<String, String> =
            serde_json::from_value(json["lora"]["kohya_metadata"].clone()).unwrap();
        assert_eq!(kohya.metadata, expected_metadata, "{family}");

        let (peft, report) = load(&dir.join("lora_peft.safetensors"), &paths).unwrap();
        assert_eq!(
            (report.matched, report.unmatched),
            (expected, vec![]),
            "{family}"
        );
        let mut worst = 0f32;
        for (path, k) in &kohya.modules {
            let p = &peft.modules[path];
            assert_eq!(
                p.alpha, 4.0,
                "{family} {path}: PEFT files have no alpha, so alpha = rank"
            );
            worst = worst.max(max_abs_diff(&k.delta(1.0).unwrap(), &p.delta(1.0).unwrap()));
        }
        println!("{family}: kohya vs PEFT delta max abs diff {worst:e}");
        assert!(
            worst <= 1e-6,
            "{family}: kohya and PEFT deltas differ by {worst:e}"
        );
    }
}

#[test]
fn saves_round_trip_with_metadata_in_every_dtype() {
    let paths = unet_module_paths("sd1");
    let (original, _) = load(&fixture("sd1").join("lora_kohya.safetensors"), &paths).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (dtype, tolerance) in [(DType::F32, 0.0), (DType::F16, 1e-3), (DType::BF16, 1e-2)] {
        let file = dir.path().join(format!("tiny-{dtype:?}.safetensors"));
        save_kohya(&original, &file, &metadata(), dtype).unwrap();
        let (back, report) = load(&file, &paths).unwrap();
        assert_eq!(report.matched.len(), original.modules.len());
        assert!(report.unmatched.is_empty());
        let mut worst = 0f32;
        for (path, m) in &original.modules {
            let b = &back.modules[path];
            assert_eq!(
                (b.alpha, b.down.dtype(), b.up.dtype()),
                (m.alpha, dtype, dtype),
                "{path}"
            );
            let (d, e) = (b.delta(1.0).unwrap(), m.delta(1.0).unwrap());
            let scale = e
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            worst = worst.max(max_abs_diff(&d, &e) / scale);
        }
        println!("{dtype:?}: round-trip delta max relative error {worst:e}");
        assert!(
            worst <= tolerance,
            "{dtype:?}: deltas differ by {worst:e} relative"
        );

        let bytes = std::fs::read(&file).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let alpha = st
            .tensor("lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2.alpha")
            .unwrap();
        assert_eq!((alpha.shape(), alpha.dtype()), (&[][..], dtype.into()));

        let meta = file_metadata(&file);
        assert_eq!(
            back.metadata,
            meta.clone().into_iter().collect::<BTreeMap<_, _>>()
        );
        for (key, value) in metadata().to_map() {
            assert_eq!(meta.get(&key), Some(&value), "{key}");
        }
        assert_eq!(meta["ss_base_model_version"], "sd_v1");
        assert_eq!(meta["modelspec.architecture"], "stable-diffusion-v1/lora");
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(
            meta["sshs_model_hash"],
            hex(&Sha256::digest(&bytes[header..]))
        );
        // A file under 1 MiB has nothing at kohya's legacy offset: the hash of no bytes.
        assert_eq!(meta["sshs_legacy_hash"], "e3b0c442");

        save_kohya(
            &original,
            &dir.path().join("again.safetensors"),
            &metadata(),
            dtype,
        )
        .unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("again.safetensors")).unwrap(),
            bytes,
            "saves are reproducible"
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A rank-64 adapter of a 4096-wide layer (2 MiB in f32), with values a Python check can rebuild.
fn large_set() -> LoraSet {
    let values =
        |n: usize| -> Vec<f32> { (0..n).map(|i| ((i % 251) as f32 - 125.0) / 125.0).collect() };
    let down = Tensor::from_vec(values(64 * 4096), (64, 4096), &Device::Cpu).unwrap();
    let up = Tensor::from_vec(values(4096 * 64), (4096, 64), &Device::Cpu).unwrap();
    let module = LoraModule::new(down, up, 32.0).unwrap();
    LoraSet {
        modules: [("unet.mid_block.attentions.0.proj_out".to_string(), module)].into(),
        metadata: BTreeMap::new(),
    }
}

#[test]
fn hashes_are_those_of_the_file_saved_with_only_training_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("large.safetensors");
    let extra = [("modelspec.description".to_string(), "x".repeat(500))].into();
    save_kohya(
        &large_set(),
        &file,
        &LoraMetadata {
            extra,
            ..metadata()
        },
        DType::F32,
    )
    .unwrap();

    // Rebuild kohya's hashing input with the safetensors crate alone: the saved tensors and the ss_* keys.
    let meta = file_metadata(&file);
    let training_only: HashMap<String, String> = meta
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let bytes = safetensors::serialize(&tensors, Some(training_only)).unwrap();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(
        meta["sshs_model_hash"],
        hex(&Sha256::digest(&bytes[header..]))
    );
    assert_eq!(
        meta["sshs_legacy_hash"],
        hex(&Sha256::digest(&bytes[0x100000..0x110000]))[..8]
    );
    // The long description is not hashed: it moves the full file's data by more than 500 bytes.
    let full = std::fs::read(&file).unwrap();
    assert_ne!(
        meta["sshs_legacy_hash"],
        hex(&Sha256::digest(&full[0x100000..0x110000]))[..8]
    );
}

#[test]
fn text_encoder_modules_use_the_lora_te_prefix() {
    let te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj";
    let zeros = |shape: (usize, usize)| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let set = LoraSet {
        modules: [(
            te.to_string(),
            LoraModule::new(zeros((2, 8)), zeros((8, 2)), 1.0).unwrap(),
        )]
        .into(),
        metadata: BTreeMap::new(),
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("te.safetensors");
    save_kohya(&set, &file, &metadata(), DType::F16).unwrap();
    let keys: BTreeSet<String> = candle_core::safetensors::load(&file, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    let name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
    assert_eq!(
        keys,
        ["alpha", "lora_down.weight", "lora_up.weight"]
            .map(|p| format!("{name}.{p}"))
            .into()
    );
    let (back, _) = load(&file, &[te.to_string()].into()).unwrap();
    assert_eq!(back.modules[te].alpha, 1.0);
}

/// The sd1 kohya fixture's tensors plus `extra`, written to a new file.
fn kohya_fixture_with(dir: &Path, extra: &[(&str, Tensor)]) -> PathBuf {
    let mut tensors =
        candle_core::safetensors::load(fixture("sd1").join("lora_kohya.safetensors"), &Device::Cpu)
            .unwrap();
    tensors.extend(extra.iter().map(|(k, t)| (k.to_string(), t.clone())));
    let file = dir.join("edited.safetensors");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    file
}

#[test]
fn foreign_and_unknown_keys_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::zeros((4, 16), DType::F32, &Device::Cpu).unwrap();
    let extra = [
        ("lora_unet_no_such_block_proj.lora_down.weight", t.clone()),
        (
            "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a",
            t.clone(),
        ),
        (
            "unet.mid_block.attentions.0.proj_out.lora_magnitude_vector",
            t,
        ),
    ];
    let file = kohya_fixture_with(dir.path(), &extra);
    let (set, report) = load(&file, &unet_module_paths("sd1")).unwrap();
    assert_eq!(set.modules.len(), 11);
    let mut expected: Vec<String> = extra.iter().map(|(k, _)| k.to_string()).collect();
    expected.sort();
    assert_eq!(report.unmatched, expected);
}

#[test]
fn broken_pairs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let paths = unet_module_paths("sd1");
    let name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let wrong_up = Tensor::zeros((16, 8), DType::F32, &Device::Cpu).unwrap();
    let up_key = format!("{name}.lora_up.weight");
    let file = kohya_fixture_with(dir.path(), &[(up_key.as_str(), wrong_up)]);
    let err = load(&file, &paths).unwrap_err().to_string();
    println!("{err}");
    for part in [
        file.display().to_string(),
        format!("{name}.lora_down.weight"),
        "[16, 8]".into(),
        "rank 4".into(),
    ] {
        assert!(err.contains(&part), "`{part}` missing from: {err}");
    }

    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture("sd1").join("lora_kohya.safetensors"), &Device::Cpu)
            .unwrap();
    tensors.remove(&up_key);
    let half = dir.path().join("half.safetensors");
    candle_core::safetensors::save(&tensors, &half).unwrap();
    let err = load(&half, &paths).unwrap_err().to_string();
    assert!(
        err.contains("needs both") && err.contains(&format!("{name}.lora_down.weight")),
        "{err}"
    );

    std::fs::write(dir.path().join("junk.safetensors"), b"not a tensor file").unwrap();
    let err = load(&dir.path().join("junk.safetensors"), &paths).unwrap_err();
    assert!(
        matches!(&err, LoraError::Invalid(m) if m.contains("not a safetensors file")),
        "{err}"
    );
}
