//! Our own LoRA files against diffusers: `lora_ours.safetensors` (written by `save_kohya`, by the ignored test
//! `write_lora_ours_fixture` below) is loaded by diffusers' `load_lora_weights` in tools/make_sd_reference.py,
//! which checks that every module of the file received an adapter and nothing was left over, and records the
//! UNet output, the text-encoder output, a full DDIM sample and its decoded image with the LoRA active
//! (`ours.*` in reference.safetensors). Here the same file goes through our loader, our UNet, our text encoder
//! and our pipeline and must give the same numbers; the decoded images (with and without the LoRA) must be
//! within 1/255 mean absolute difference.
//!
//! Regenerating: first `cargo test --test lora_roundtrip -- --ignored write_lora_ours_fixture`, then
//! `.venv-ref/bin/python tools/make_sd_reference.py` (tools/README.md).

mod common;

use common::sd_tiny::{
    compare, fixture, fixture_json, load_unet, max_abs, model_module_paths, reference, with_lora,
};

use candle_core::{DType, Device, Tensor};
use lora_studio::lora::{BaseModel, ConvLora, LoraMetadata, LoraModule, LoraSet, load, save_kohya};
use lora_studio::model::checkpoint;
use lora_studio::sample::Sampler;
use lora_studio::sample::pipeline::{Pipeline, Request};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

const FAMILIES: [&str; 2] = ["sd1", "sd2v"];
const RANK: usize = 4;
const PROMPT: &str = "a photo of sks person, oil painting";
const OURS: &str = "lora_ours.safetensors";

/// 3×3 convs of resnets that get a LoCon adapter (conv down [r, in, 3, 3], up [out, r, 1, 1]).
const LOCON_CONVS: [&str; 3] = [
    "down_blocks.0.resnets.0.conv1",
    "mid_block.resnets.1.conv2",
    "up_blocks.1.resnets.1.conv1",
];
const CONV_ALPHA: f32 = 8.0;
const TE_ALPHA: f32 = 8.0;
const ATTENTION_ALPHA: f32 = 2.0;

/// Module names (the end of the path) adapted in every transformer of the UNet.
const TRANSFORMER_TARGETS: [&str; 8] = [
    ".proj_in",
    ".proj_out",
    ".to_q",
    ".to_k",
    ".to_v",
    ".to_out.0",
    ".ff.net.0.proj",
    ".ff.net.2",
];

/// Module names adapted in every layer of the text encoder.
const TEXT_ENCODER_TARGETS: [&str; 6] = [
    ".self_attn.q_proj",
    ".self_attn.k_proj",
    ".self_attn.v_proj",
    ".self_attn.out_proj",
    ".mlp.fc1",
    ".mlp.fc2",
];

fn mean_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().mean_all().unwrap().to_scalar().unwrap()
}

/// `*.weight` tensor shapes of a safetensors file, by module path (the name without `.weight`).
fn weight_shapes(file: PathBuf) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(file).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .iter()
        .filter_map(|(name, view)| {
            Some((
                name.strip_suffix(".weight")?.to_owned(),
                view.shape().to_vec(),
            ))
        })
        .collect()
}

/// Every module `lora_ours` adapts, as `unet.…` / `text_encoder.…` paths, with the shape of its weight, taken
/// from the tiny diffusers weights: the attention projections, feed-forward and proj_in/proj_out of every
/// transformer, a few 3×3 resnet convs, and q/k/v/out and fc1/fc2 of every text-encoder layer.
fn target_modules(family: &str) -> BTreeMap<String, Vec<usize>> {
    let diffusers = fixture(family).join("diffusers");
    let mut targets = BTreeMap::new();
    for (stem, shape) in weight_shapes(diffusers.join("unet/diffusion_pytorch_model.safetensors")) {
        let in_transformer =
            stem.contains(".attentions.") && TRANSFORMER_TARGETS.iter().any(|t| stem.ends_with(t));
        if in_transformer || LOCON_CONVS.contains(&stem.as_str()) {
            targets.insert(format!("unet.{stem}"), shape);
        }
    }
    for (stem, shape) in weight_shapes(diffusers.join("text_encoder/model.safetensors")) {
        if stem.contains(".encoder.layers.")
            && TEXT_ENCODER_TARGETS.iter().any(|t| stem.ends_with(t))
        {
            targets.insert(format!("text_encoder.{stem}"), shape);
        }
    }
    targets
}

fn uniform(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// The adapter of `lora_ours`: rank 4, `down` and `up` both ~U(-0.1, 0.1) from a seeded generator (so every
/// module really changes the output), with per-module alphas (`alpha_of`).
fn ours_set(family: &str) -> LoraSet {
    let seed = match family {
        "sd1" => 0x5EED_0001,
        _ => 0x5EED_0002,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut set = LoraSet::default();
    let mut other_index = 0;
    for (path, shape) in target_modules(family) {
        let (down_shape, up_shape) = match shape.as_slice() {
            [out, inp] => (vec![RANK, *inp], vec![*out, RANK]),
            [out, inp, kh, kw] => (vec![RANK, *inp, *kh, *kw], vec![*out, RANK, 1, 1]),
            s => panic!("{path}: unexpected weight shape {s:?}"),
        };
        let alpha = alpha_of(&path, &shape, &mut other_index);
        let down = uniform(&mut rng, &down_shape);
        let up = uniform(&mut rng, &up_shape);
        set.modules
            .insert(path, LoraModule::new(down, up, alpha).unwrap());
    }
    set
}

/// Alpha per module (scale alpha/4): 3x3 convs `CONV_ALPHA` (8), the text encoder `TE_ALPHA` (8), the UNet's
/// attention projections `ATTENTION_ALPHA` (2), and the UNet's proj_in/proj_out/ff layers alternately 2 and 8 in
/// path order. The attention projections and the text encoder keep one alpha each because diffusers 0.42.1 cannot
/// give them per-module alphas: it turns a kohya file's differing alphas into a PEFT `alpha_pattern` whose keys
/// for attention layers (`…attn1.processor.to_q_lora.down.weight`) and for text-encoder layers
/// (`text_model.encoder.layers.0.self_attn`) match no module, so those layers silently get the most common alpha
/// of their network instead of their own (kohya, ComfyUI, A1111 and we apply each `.alpha`). The script checks
/// every module's scale after `load_lora_weights`, so a file diffusers would misread fails there.
fn alpha_of(path: &str, shape: &[usize], other_index: &mut usize) -> f32 {
    if shape.len() == 4 && shape[2] == 3 {
        CONV_ALPHA
    } else if path.starts_with("text_encoder.") {
        TE_ALPHA
    } else if path.contains(".attn1.") || path.contains(".attn2.") {
        ATTENTION_ALPHA
    } else {
        *other_index += 1;
        if *other_index % 2 == 1 { 2.0 } else { 8.0 }
    }
}

fn ours_metadata(family: &str) -> LoraMetadata {
    let (base_model, resolution) = match family {
        "sd1" => (BaseModel::Sd1, (512, 512)),
        _ => (BaseModel::Sd2V, (768, 768)),
    };
    LoraMetadata {
        base_model,
        network_dim: RANK,
        network_alpha: 2.0,
        conv: Some(ConvLora {
            dim: RANK,
            alpha: CONV_ALPHA,
        }),
        output_name: format!("lora_ours_{family}"),
        training_started_at: UNIX_EPOCH + Duration::from_secs(1_767_225_600),
        saved_at: UNIX_EPOCH + Duration::from_secs(1_767_229_200),
        steps: 100,
        epoch: 1,
        learning_rate: 1e-4,
        resolution,
        num_train_images: 10,
        dataset_dirs: BTreeMap::new(),
        tag_frequency: BTreeMap::new(),
        extra: [(
            "ss_seed".to_string(),
            "1".to_string(), // a fixed value: the file must come out byte-identical every time
        )]
        .into(),
    }
}

/// Writes `tests/fixtures/sd_tiny/{sd1,sd2v}/lora_ours.safetensors`. Run it before
/// tools/make_sd_reference.py, which loads these files into diffusers and records what they do.
#[test]
#[ignore = "writes the lora_ours fixtures; run before tools/make_sd_reference.py"]
fn write_lora_ours_fixture() {
    for family in FAMILIES {
        let set = ours_set(family);
        let path = fixture(family).join(OURS);
        save_kohya(&set, &path, &ours_metadata(family), DType::F32).unwrap();
        println!(
            "{family}: wrote {} ({} modules)",
            path.display(),
            set.modules.len()
        );
    }
}

/// The committed file is what the writer makes (byte for byte), it loads against our UNet and text encoder
/// with every key matched, and diffusers adapted exactly as many modules (fixture.json, checked by the script).
#[test]
fn ours_file_is_reproducible_and_fully_matched() {
    let dir = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        let file = fixture(family).join(OURS);
        let again = dir.path().join(format!("{family}.safetensors"));
        save_kohya(
            &ours_set(family),
            &again,
            &ours_metadata(family),
            DType::F32,
        )
        .unwrap();
        assert!(
            std::fs::read(&file).unwrap() == std::fs::read(&again).unwrap(),
            "{family}: {} is not what write_lora_ours_fixture writes; rerun it and then \
             tools/make_sd_reference.py",
            file.display()
        );

        let files = checkpoint::open(&fixture(family).join("diffusers")).unwrap();
        let mut unet = load_unet(&files);
        let paths = model_module_paths(&files, &mut unet);
        let (set, report) = load(&file, &paths).unwrap();
        assert!(
            report.unmatched.is_empty(),
            "{family}: unmatched {:?}",
            report.unmatched
        );
        let expected: Vec<String> = target_modules(family).into_keys().collect();
        assert_eq!(report.matched, expected, "{family}");
        let unet_modules = expected.iter().filter(|p| p.starts_with("unet.")).count();
        let te_modules = expected.len() - unet_modules;
        assert!(unet_modules >= 48 + LOCON_CONVS.len() && te_modules == 12);
        let version = if family == "sd1" { "sd_v1" } else { "sd_v2_v" };
        assert_eq!(set.metadata["ss_base_model_version"], version);

        let json = fixture_json(family);
        let check = &json["lora_ours"];
        assert_eq!(check["file_modules"], expected.len(), "{family}: {check}");
        assert_eq!(
            check["diffusers_adapted"]["unet"], unet_modules,
            "{family}: {check}"
        );
        assert_eq!(
            check["diffusers_adapted"]["text_encoder"], te_modules,
            "{family}: {check}"
        );
        assert_eq!(check["diffusers_warnings"], serde_json::json!([]));
        println!(
            "{family}: {} modules ({unet_modules} UNet incl. {} LoCon, {te_modules} text encoder); our loader: 0 \
             unmatched keys; diffusers: {check}",
            expected.len(),
            LOCON_CONVS.len()
        );
    }
}

/// Attached unmerged at weight 1 on our UNet, and merged into our text encoder as the pipeline does, the file
/// gives diffusers' outputs with the file loaded by `load_lora_weights`.
#[test]
fn ours_on_our_unet_and_text_encoder_matches_diffusers() {
    for family in FAMILIES {
        let r = reference(family);
        let ours = with_lora(family, &fixture(family).join(OURS), &r);
        assert_eq!(
            ours.unet_attached,
            ours.set
                .modules
                .keys()
                .filter(|k| k.starts_with("unet."))
                .count()
        );
        let (err, scale, change) = compare(&ours.unet_out, &r["ours.unet_out"], &r["unet.out"]);
        println!(
            "{family}: UNet with lora_ours: max abs error {err:e} (output absmax {scale}; the LoRA changes it by up \
             to {change})"
        );
        assert!(
            err <= 1e-4 * scale.max(1.0),
            "{family}: UNet max abs error {err}"
        );
        assert!(change > 1e-2, "{family}: the LoRA barely changes the UNet");

        let (err, scale, change) = compare(
            &ours.te_last,
            &r["ours.te_last"],
            &r["te.last_hidden_state"],
        );
        println!(
            "{family}: text encoder with lora_ours: max abs error {err:e} (absmax {scale}; the LoRA changes it by \
             up to {change})"
        );
        assert!(
            err <= 1e-4 * scale.max(1.0),
            "{family}: text encoder max abs error {err}"
        );
        assert!(
            change > 1e-2,
            "{family}: the LoRA barely changes the text encoder"
        );
    }
}

/// `[1, 3, H, W]` in [-1, 1] → [0, 1], clipped, as diffusers' image processor does.
fn to_unit(images: &Tensor) -> Tensor {
    ((images + 1.0).unwrap() * 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap()
}

/// An 8-bit RGB image as `[1, 3, H, W]` in [0, 1].
fn rgb_to_unit(image: &image::RgbImage) -> Tensor {
    let (w, h) = image.dimensions();
    let pixels = Tensor::from_vec(
        image.as_raw().clone(),
        (h as usize, w as usize, 3),
        &Device::Cpu,
    )
    .unwrap();
    (pixels
        .permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        / 255.0)
        .unwrap()
}

/// The whole pipeline — prompt → tokenizer → text encoder (LoRA merged) → UNet (LoRA attached) → DDIM, 4
/// steps, cfg 3, from `sample.latents_in` → VAE — against diffusers with the file loaded by
/// `load_lora_weights`, and without a LoRA: latents to 1e-4, images within 1/255 mean absolute difference
/// (both as decoded floats and as the 8-bit image `generate` returns).
#[test]
fn pipeline_ddim_sample_and_image_match_diffusers_with_and_without_ours() {
    for family in FAMILIES {
        let r = reference(family);
        let folder = fixture(family).join("diffusers");
        let req = Request {
            prompt: PROMPT.into(),
            negative: String::new(),
            seed: 0,
            steps: 4,
            cfg: 3.0,
            sampler: Sampler::Ddim,
            width: 32,
            height: 32,
            latents: Some(r["sample.latents_in"].clone()),
        };
        let lora = [(fixture(family).join(OURS), 1.0)];
        let mut images = Vec::new();
        for (loras, prefix) in [(&[][..], "sample"), (&lora[..], "ours")] {
            let p = Pipeline::load(&folder, None, loras, &Device::Cpu, DType::F32).unwrap();
            assert!(p.warnings.is_empty(), "{family}: {:?}", p.warnings);
            let latents = p.latents(&req, |_, _| {}).unwrap();
            let expected = &r[&format!("{prefix}.ddim_out")];
            let (err, scale) = (max_abs(&(&latents - expected).unwrap()), max_abs(expected));
            assert!(
                err <= 1e-4 * scale.max(1.0),
                "{family} {prefix}: DDIM latents max abs error {err} (scale {scale})"
            );

            let expected = &r[&format!("{prefix}.ddim_image")];
            let decoded = to_unit(&p.decode(&latents).unwrap());
            let diff = (&decoded - expected).unwrap();
            let (float_mean, float_max) = (mean_abs(&diff), max_abs(&diff));
            let rgb = p.generate(&req, |_, _| {}).unwrap();
            let u8_mean = mean_abs(&(rgb_to_unit(&rgb) - expected).unwrap());
            println!(
                "{family} {prefix}: DDIM latents max abs error {err:e} (scale {scale}); image vs diffusers: decoded \
                 floats mean abs {float_mean:e} (max {float_max:e}), generate's 8-bit image mean abs {u8_mean:e} \
                 = {:.3}/255",
                u8_mean * 255.0
            );
            assert!(
                float_mean <= 1.0 / 255.0 && u8_mean <= 1.0 / 255.0,
                "{family} {prefix}: image mean abs difference {float_mean} (float) / {u8_mean} (8-bit)"
            );
            images.push(expected.clone());
        }
        // Otherwise the comparison with the LoRA would prove nothing.
        let change = mean_abs(&(&images[1] - &images[0]).unwrap());
        println!(
            "{family}: lora_ours changes diffusers' image by {:.2}/255 on average",
            change * 255.0
        );
        assert!(
            change > 4.0 / 255.0,
            "{family}: the LoRA barely changes the image ({change})"
        );
    }
}
