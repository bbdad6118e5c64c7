//! Our UNet against diffusers on the tiny random-weight fixtures, and gradients through every adapter.

mod common;

use common::sd_tiny::{fixture, max_abs, reference};

use candle_core::{DType, Device, Tensor};
use lora_studio::model::layers::with_dropout_key;
use lora_studio::model::unet::{UNet, UNetConfig, UNetOptions};
use lora_studio::model::weights::MemoryWeights;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

fn load_unet(family: &str, options: UNetOptions) -> UNet {
    let dir = fixture(family).join("diffusers/unet");
    let config: UNetConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    UNet::load(
        &MemoryWeights::new(tensors),
        &config,
        options,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn run(unet: &UNet, r: &HashMap<String, Tensor>) -> Tensor {
    let t = r["unet.timesteps"].to_dtype(DType::F32).unwrap();
    unet.forward(&r["unet.sample_in"], &t, &r["unet.encoder_hidden_states"])
        .unwrap()
}

#[test]
fn matches_diffusers_sd1_and_sd2v() {
    for family in ["sd1", "sd2v"] {
        let r = reference(family);
        let out = run(&load_unet(family, UNetOptions::default()), &r);
        let err = max_abs(&(&out - &r["unet.out"]).unwrap());
        let scale = max_abs(&r["unet.out"]);
        assert!(
            err < 1e-4 * scale.max(1.0),
            "{family}: max abs error {err} (output scale {scale})"
        );
        let chunked = run(
            &load_unet(
                family,
                UNetOptions {
                    attention_chunk: Some(7),
                    ..Default::default()
                },
            ),
            &r,
        );
        assert!(
            max_abs(&(&chunked - &out).unwrap()) < 1e-5,
            "{family}: chunked attention differs"
        );
    }
}

/// Every adapter parameter — LoRA on every linear and 1×1 conv, LoCon on every 3×3 conv — receives a finite,
/// non-zero gradient, and recompute gives the same gradients as keeping activations, also with adapter dropout
/// (whose masks the recomputed forward must draw again exactly).
#[test]
fn every_adapter_gets_a_gradient_with_and_without_recompute() {
    let r = reference("sd1");
    for dropout in [0.0, 0.3] {
        let mut grads_by_mode = Vec::new();
        for recompute in [false, true] {
            grads_by_mode.push(adapter_gradients(&r, recompute, dropout));
        }
        for (a, b) in grads_by_mode[0].iter().zip(&grads_by_mode[1]) {
            let err = max_abs(&(a - b).unwrap());
            assert!(
                err <= 1e-5 * max_abs(a).max(1e-3),
                "dropout {dropout}: recompute changes a gradient by {err}"
            );
        }
    }
}

/// The gradients of every adapter on every layer (seeded, `up` away from zero) for one forward and backward.
fn adapter_gradients(r: &HashMap<String, Tensor>, recompute: bool, dropout: f64) -> Vec<Tensor> {
    let mut unet = load_unet(
        "sd1",
        UNetOptions {
            recompute,
            ..Default::default()
        },
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut vars = Vec::new();
    for layer in unet.layers_mut().unwrap() {
        let path = layer.path.clone();
        layer.add_adapter(2, 2.0, &mut rng).unwrap();
        let a = layer.adapters.last_mut().unwrap();
        a.dropout = dropout;
        // Start `up` away from zero, or `down` could not receive a gradient.
        let n = a.up.elem_count();
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect();
        let noise = Tensor::from_vec(values, a.up.shape(), &Device::Cpu).unwrap();
        a.up.set(&noise).unwrap();
        vars.push((path, a.down.clone(), a.up.clone()));
    }
    let grads = with_dropout_key(7, || {
        let out = run(&unet, r);
        let loss = out.sqr().unwrap().mean_all().unwrap();
        unet.backward(&loss).unwrap()
    });
    let mut collected = Vec::new();
    for (path, down, up) in &vars {
        for (what, v) in [("down", down), ("up", up)] {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("recompute={recompute}: no gradient for {path}.{what}"));
            let m = max_abs(g);
            assert!(
                m.is_finite() && m > 0.0,
                "recompute={recompute} dropout={dropout}: {path}.{what} gradient {m}"
            );
            collected.push(g.clone());
        }
    }
    assert!(vars.len() > 40, "all layers adapted: {}", vars.len());
    collected
}

/// A kohya and a PEFT LoRA file, attached unmerged or merged, give diffusers' output with the LoRA merged.
#[test]
fn lora_files_applied_match_diffusers() {
    use lora_studio::model::adapters::{Attach, attach};
    for family in ["sd1", "sd2v"] {
        let r = reference(family);
        for (file, how) in [
            ("lora_kohya.safetensors", Attach::Unmerged),
            ("lora_kohya.safetensors", Attach::Merged),
            ("lora_peft.safetensors", Attach::Unmerged),
        ] {
            let mut unet = load_unet(family, UNetOptions::default());
            let paths = unet.module_paths().unwrap();
            let (set, report) =
                lora_studio::lora::load(&fixture(family).join(file), &paths).unwrap();
            assert!(
                report.unmatched.is_empty(),
                "{family}/{file}: unmatched {:?}",
                report.unmatched
            );
            let n = attach(unet.layers_mut().unwrap(), &set, "unet", 1.0, how).unwrap();
            assert_eq!(n, set.modules.len());
            let out = run(&unet, &r);
            let err = max_abs(&(&out - &r["lora.unet_out"]).unwrap());
            let scale = max_abs(&r["lora.unet_out"]);
            assert!(
                err < 1e-4 * scale.max(1.0),
                "{family}/{file}/{how:?}: max abs error {err}"
            );
        }
    }
}

/// Adapters placed by the target setting, trained (here: given values), saved as a kohya file and loaded onto a
/// fresh network reproduce the trained network's output.
#[test]
fn trained_adapters_round_trip_through_a_kohya_file() {
    use lora_studio::lora::{BaseModel, LoraMetadata, save_kohya};
    use lora_studio::model::adapters::{Attach, Slot, Trainable, attach, unet_slot};
    use lora_studio::train::config::Targets;
    let r = reference("sd1");
    let mut counts = Vec::new();
    for targets in [
        Targets::Attention,
        Targets::AttentionAndFeedForward,
        Targets::All,
    ] {
        let mut unet = load_unet("sd1", UNetOptions::default());
        let slots: Vec<Option<Slot>> = unet
            .layers_mut()
            .unwrap()
            .iter()
            .map(|l| unet_slot(l, targets))
            .collect();
        counts.push((
            slots.iter().flatten().count(),
            slots.contains(&Some(Slot::Conv)),
        ));
        if targets != Targets::All {
            continue;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let trained = Trainable::attach(
            unet.layers_mut().unwrap(),
            |l| unet_slot(l, targets),
            (4, 2.0),
            (2, 1.0),
            0.0,
            &mut rng,
        )
        .unwrap();
        for (_, a) in &trained.adapters {
            let values: Vec<f32> = (0..a.up.elem_count())
                .map(|_| rng.random_range(-0.05f32..0.05))
                .collect();
            a.up.set(&Tensor::from_vec(values, a.up.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let expected = run(&unet, &r);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("trained.safetensors");
        let meta = LoraMetadata {
            base_model: BaseModel::Sd1,
            network_dim: 4,
            network_alpha: 2.0,
            conv: None,
            output_name: "trained".into(),
            training_started_at: std::time::SystemTime::UNIX_EPOCH,
            saved_at: std::time::SystemTime::UNIX_EPOCH,
            steps: 1,
            epoch: 1,
            learning_rate: 1e-4,
            resolution: (512, 512),
            num_train_images: 1,
            dataset_dirs: Default::default(),
            tag_frequency: Default::default(),
            extra: Default::default(),
        };
        save_kohya(&trained.to_set("unet").unwrap(), &file, &meta, DType::F32).unwrap();
        let mut fresh = load_unet("sd1", UNetOptions::default());
        let (set, report) = lora_studio::lora::load(&file, &fresh.module_paths().unwrap()).unwrap();
        assert!(report.unmatched.is_empty());
        assert_eq!(
            attach(
                fresh.layers_mut().unwrap(),
                &set,
                "unet",
                1.0,
                Attach::Unmerged
            )
            .unwrap(),
            trained.adapters.len()
        );
        let err = max_abs(&(&run(&fresh, &r) - &expected).unwrap());
        assert!(err < 1e-5, "max abs error {err}");
    }
    assert!(
        counts[0].0 < counts[1].0 && counts[1].0 < counts[2].0,
        "{counts:?}"
    );
    assert!(
        !counts[0].1 && !counts[1].1 && counts[2].1,
        "LoCon only with `all`: {counts:?}"
    );
}
