//! Loading base models: detection, the LDM → diffusers key map, the text encoder, the VAE and the tokenizer,
//! checked against the tiny reference models in tests/fixtures/sd_tiny (made with diffusers/transformers).

mod common;

use common::sd_tiny::{fixture, fixture_json, reference};

use candle_core::{DType, Device, Tensor};
use lora_studio::model::checkpoint::{
    self, CheckpointError, Family, Layout, ModelFiles, Prediction,
};
use lora_studio::model::text_encoder::TextEncoder;
use lora_studio::model::tokenizer::{ClipTokenizer, WINDOW};
use lora_studio::model::vae::{Vae, VaeConfig};
use lora_studio::model::weights::Weights;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOLERANCE: f32 = 1e-4;

/// Every way each fixture family is stored.
fn layouts(family: &str) -> Vec<PathBuf> {
    let dir = fixture(family);
    let mut paths = vec![dir.join("diffusers"), dir.join("single.safetensors")];
    if family == "sd1" {
        paths.push(dir.join("single-fp16.safetensors"));
    }
    paths
}

/// Opens a fixture; single files get the real configs of the tiny networks (their head and group counts are
/// not the SD standard that a single file's shapes imply).
fn open_tiny(path: &Path) -> ModelFiles {
    let mut model = checkpoint::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if model.layout == Layout::SingleFile {
        let diffusers = checkpoint::open(&path.with_file_name("diffusers")).unwrap();
        model.unet_config = diffusers.unet_config.clone();
        model.vae_config = diffusers.vae_config.clone();
        model.text_encoder_config = diffusers.text_encoder_config.clone();
    }
    model
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let err = max_abs_diff(got, want);
    eprintln!("{what}: max abs err {err:.3e}");
    assert!(err <= TOLERANCE, "{what}: max abs err {err} > {TOLERANCE}");
}

#[test]
fn fixtures_are_detected() {
    for (family, expected, prediction) in [
        ("sd1", Family::Sd1, Prediction::Epsilon),
        ("sd2v", Family::Sd2, Prediction::V),
    ] {
        for path in layouts(family) {
            let model =
                checkpoint::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            eprintln!("{}: {}", path.display(), model.describe());
            assert_eq!(model.family, expected, "{}", path.display());
            assert_eq!(model.prediction, prediction, "{}", path.display());
            let is_dir = path.is_dir();
            assert_eq!(
                model.layout,
                if is_dir {
                    Layout::Diffusers
                } else {
                    Layout::SingleFile
                }
            );
        }
    }
}

#[test]
fn configs_match_the_fixture() {
    for family in ["sd1", "sd2v"] {
        let json = fixture_json(family);
        let diffusers = checkpoint::open(&fixture(family).join("diffusers")).unwrap();
        let heads: Vec<usize> =
            serde_json::from_value(json["unet"]["derived"]["heads_per_block"].clone()).unwrap();
        for (block, &h) in heads.iter().enumerate() {
            assert_eq!(
                diffusers.unet_config.heads(block),
                h,
                "{family} block {block}"
            );
        }
        // What a single file's shapes tell must agree with the real config.
        let single = checkpoint::open(&fixture(family).join("single.safetensors")).unwrap();
        let (s, d) = (&single.unet_config, &diffusers.unet_config);
        assert_eq!(s.block_out_channels, d.block_out_channels, "{family}");
        assert_eq!(s.layers_per_block, d.layers_per_block, "{family}");
        assert_eq!(s.cross_attention_dim, d.cross_attention_dim, "{family}");
        assert_eq!(s.use_linear_projection, d.use_linear_projection, "{family}");
        assert_eq!(s.down_block_types, d.down_block_types, "{family}");
        assert_eq!(s.up_block_types, d.up_block_types, "{family}");
        assert_eq!(
            (s.in_channels, s.out_channels),
            (d.in_channels, d.out_channels),
            "{family}"
        );
        let (sv, dv) = (&single.vae_config, &diffusers.vae_config);
        assert_eq!(
            (
                &sv.block_out_channels,
                sv.layers_per_block,
                sv.latent_channels
            ),
            (
                &dv.block_out_channels,
                dv.layers_per_block,
                dv.latent_channels
            ),
            "{family}"
        );
        let (st, dt) = (&single.text_encoder_config, &diffusers.text_encoder_config);
        assert_eq!(
            (
                st.vocab_size,
                st.hidden_size,
                st.intermediate_size,
                st.num_hidden_layers,
                st.hidden_act
            ),
            (
                dt.vocab_size,
                dt.hidden_size,
                dt.intermediate_size,
                dt.num_hidden_layers,
                dt.hidden_act
            ),
            "{family}"
        );
    }
}

/// Every tensor of the diffusers folder is answered identically (bit for bit in f32; after the same fp16
/// rounding for the fp16 file) by the single-file source, and the single file answers nothing more.
#[test]
fn single_files_answer_every_diffusers_name_identically() {
    for family in ["sd1", "sd2v"] {
        let diffusers = checkpoint::open(&fixture(family).join("diffusers")).unwrap();
        for path in layouts(family).into_iter().skip(1) {
            let single = checkpoint::open(&path).unwrap();
            let fp16 = path.to_string_lossy().contains("fp16");
            let parts: [(&str, &dyn Weights, &dyn Weights); 3] = [
                ("unet", diffusers.unet(), single.unet()),
                ("vae", diffusers.vae(), single.vae()),
                (
                    "text encoder",
                    diffusers.text_encoder(),
                    single.text_encoder(),
                ),
            ];
            for (part, want, got) in parts {
                let mut want_names = want.names();
                let mut got_names = got.names();
                want_names.sort();
                got_names.sort();
                assert_eq!(
                    got_names,
                    want_names,
                    "{} {part}: names differ",
                    path.display()
                );
                for name in &want_names {
                    let mut expected = want.get(name, DType::F32, &Device::Cpu).unwrap();
                    if fp16 {
                        expected = expected
                            .to_dtype(DType::F16)
                            .unwrap()
                            .to_dtype(DType::F32)
                            .unwrap();
                    }
                    let found = got.get(name, DType::F32, &Device::Cpu).unwrap();
                    assert_eq!(
                        got.shape(name).unwrap(),
                        expected.dims(),
                        "{} {name}",
                        path.display()
                    );
                    assert_eq!(
                        max_abs_diff(&found, &expected),
                        0.0,
                        "{} {name}",
                        path.display()
                    );
                }
            }
        }
    }
}

#[test]
fn text_encoder_matches_reference() {
    for family in ["sd1", "sd2v"] {
        let reference = reference(family);
        for path in layouts(family) {
            let model = open_tiny(&path);
            let encoder = TextEncoder::new(
                model.text_encoder(),
                &model.text_encoder_config,
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
            let out = encoder.forward(&reference["te.input_ids"]).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            // fp16 weights are the reference weights rounded; the outputs move by more than the tolerance.
            if name.contains("fp16") {
                assert!(max_abs_diff(&out.last, &reference["te.last_hidden_state"]) < 2e-2);
                continue;
            }
            assert_close(
                &format!("{family}/{name} te.last"),
                &out.last,
                &reference["te.last_hidden_state"],
            );
            assert_close(
                &format!("{family}/{name} te.penultimate"),
                &out.penultimate,
                &reference["te.penultimate_hidden_state"],
            );
            assert_close(
                &format!("{family}/{name} te.pooled"),
                &out.pooled,
                &reference["te.pooled"],
            );
            assert_eq!(out.context(2).unwrap().dims(), out.penultimate.dims());
            assert!(out.context(3).is_err());
        }
    }
}

#[test]
fn vae_matches_reference() {
    for family in ["sd1", "sd2v"] {
        let reference = reference(family);
        for path in layouts(family)
            .into_iter()
            .filter(|p| !p.to_string_lossy().contains("fp16"))
        {
            let model = open_tiny(&path);
            let name = format!("{family}/{}", path.file_name().unwrap().to_string_lossy());
            check_vae(&name, model.vae(), &model.vae_config, &reference);
        }
    }
}

fn check_vae(
    name: &str,
    weights: &dyn Weights,
    config: &VaeConfig,
    reference: &HashMap<String, Tensor>,
) {
    let vae = Vae::new(weights, config, DType::F32, &Device::Cpu).unwrap();
    let posterior = vae.encode(&reference["vae.image_in"]).unwrap();
    assert_close(
        &format!("{name} vae.latent_mean"),
        &posterior.mean,
        &reference["vae.latent_mean"],
    );
    assert_close(
        &format!("{name} vae.latent_logvar"),
        &posterior.logvar,
        &reference["vae.latent_logvar"],
    );
    let decoded = vae.decode(&reference["vae.latent_mean"]).unwrap();
    assert_close(
        &format!("{name} vae.decoded"),
        &decoded,
        &reference["vae.decoded"],
    );
    // Seeded samples repeat and differ from the mean.
    let a = posterior.sample(7).unwrap();
    assert_eq!(max_abs_diff(&a, &posterior.sample(7).unwrap()), 0.0);
    assert!(max_abs_diff(&a, &posterior.mean) > 0.0);
}

#[test]
fn separate_vae_files_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let single = fixture("sd1").join("single.safetensors");
    let all = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    let vae_only = |strip: bool| -> HashMap<String, Tensor> {
        all.iter()
            .filter_map(|(k, t)| {
                let rest = k.strip_prefix("first_stage_model.")?;
                Some((if strip { rest.to_owned() } else { k.clone() }, t.clone()))
            })
            .collect()
    };
    let with_prefix = dir.path().join("vae-ldm-prefixed.safetensors");
    let bare = dir.path().join("vae-ldm.safetensors");
    candle_core::safetensors::save(&vae_only(false), &with_prefix).unwrap();
    candle_core::safetensors::save(&vae_only(true), &bare).unwrap();
    let diffusers_vae = fixture("sd1").join("diffusers/vae");
    let reference = reference("sd1");
    for vae_path in [with_prefix.clone(), bare, diffusers_vae] {
        let model = open_tiny(&single)
            .with_vae(&vae_path)
            .unwrap_or_else(|e| panic!("{}: {e}", vae_path.display()));
        assert_eq!(model.vae_path.as_deref(), Some(vae_path.as_path()));
        check_vae(
            &format!("override {}", vae_path.display()),
            model.vae(),
            &model.vae_config,
            &reference,
        );
    }
    // A VAE file opened as the model is refused, pointing at the override.
    let err = checkpoint::open(&with_prefix).err().unwrap();
    assert!(matches!(err, CheckpointError::VaeOnly { .. }), "{err}");
    assert!(err.to_string().contains("VAE override"), "{err}");
    // A LoRA is not a VAE either.
    let err = open_tiny(&single)
        .with_vae(&fixture("sd1").join("lora_kohya.safetensors"))
        .err()
        .unwrap();
    assert!(matches!(err, CheckpointError::IsLora { .. }), "{err}");
}

#[test]
fn prediction_can_be_overridden() {
    let model = checkpoint::open(&fixture("sd2v").join("single.safetensors")).unwrap();
    assert!(
        model.prediction_reason.contains("assumed"),
        "{}",
        model.prediction_reason
    );
    let model = model.with_prediction(Prediction::Epsilon);
    assert_eq!(model.prediction, Prediction::Epsilon);
    assert_eq!(model.prediction_reason, "set by you");
}

#[test]
fn modelspec_metadata_decides_the_prediction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eps.safetensors");
    let tensors =
        candle_core::safetensors::load(fixture("sd2v").join("single.safetensors"), &Device::Cpu)
            .unwrap();
    let metadata = HashMap::from([("modelspec.prediction_type".to_owned(), "epsilon".to_owned())]);
    safetensors::serialize_to_file(
        tensors.iter().map(|(k, v)| (k.clone(), v.clone())),
        Some(metadata),
        &path,
    )
    .unwrap();
    let model = checkpoint::open(&path).unwrap();
    assert_eq!(model.prediction, Prediction::Epsilon);
    assert!(
        model.prediction_reason.contains("metadata"),
        "{}",
        model.prediction_reason
    );
}

#[test]
fn summary_counts_parameters_and_precision() {
    let single = checkpoint::open(&fixture("sd1").join("single.safetensors"))
        .unwrap()
        .summary();
    let fp16 = checkpoint::open(&fixture("sd1").join("single-fp16.safetensors"))
        .unwrap()
        .summary();
    let folder = checkpoint::open(&fixture("sd1").join("diffusers"))
        .unwrap()
        .summary();
    assert_eq!(single.parameters, folder.parameters);
    assert_eq!(fp16.parameters, folder.parameters);
    assert_eq!(
        (single.main_dtype.as_str(), fp16.main_dtype.as_str()),
        ("F32", "F16")
    );
    assert_eq!(fp16.bytes * 2, single.bytes);
    // open_clip's fused q/k/v counts once.
    let sd2 = checkpoint::open(&fixture("sd2v").join("single.safetensors"))
        .unwrap()
        .summary();
    let sd2_folder = checkpoint::open(&fixture("sd2v").join("diffusers"))
        .unwrap()
        .summary();
    assert_eq!(sd2.parameters, sd2_folder.parameters);
}

#[test]
fn tiny_tokenizer_reproduces_the_fixture_ids() {
    for family in ["sd1", "sd2v"] {
        let json = fixture_json(family);
        let dir = fixture(family).join("diffusers/tokenizer");
        let pad = json["tokenizer"]["pad_id"].as_u64().unwrap() as u32;
        let tokenizer =
            ClipTokenizer::from_files(&dir.join("vocab.json"), &dir.join("merges.txt"), pad)
                .unwrap();
        assert_eq!(
            tokenizer.bos() as u64,
            json["tokenizer"]["bos_id"].as_u64().unwrap()
        );
        assert_eq!(
            tokenizer.eos() as u64,
            json["tokenizer"]["eos_id"].as_u64().unwrap()
        );
        let ids = reference(family)["te.input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap();
        for (row, prompt) in json["tokenizer"]["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let tokens = tokenizer.tokenize(prompt.as_str().unwrap(), 1);
            assert_eq!(tokens.ids, ids[row], "{family} prompt {row}");
            assert_eq!(tokens.dropped, 0);
        }
    }
}

#[test]
fn tiny_tokenizer_rejects_a_mismatched_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = fixture("sd1").join("diffusers/tokenizer");
    let mut vocab: HashMap<String, u32> =
        serde_json::from_str(&std::fs::read_to_string(tokenizer.join("vocab.json")).unwrap())
            .unwrap();
    vocab.insert("<|endoftext|>".into(), 3);
    let bad = dir.path().join("vocab.json");
    std::fs::write(&bad, serde_json::to_string(&vocab).unwrap()).unwrap();
    let err = ClipTokenizer::from_files(&bad, &tokenizer.join("merges.txt"), 0)
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a CLIP tokenizer"), "{err}");
}

/// Ids from transformers' `CLIPTokenizer` with OpenAI's CLIP vocabulary (as in openai/clip-vit-large-patch14).
#[test]
fn bundled_tokenizer_gives_clip_ids() {
    let sd1 = ClipTokenizer::bundled(Family::Sd1);
    let cases: [(&str, &[u32]); 4] = [
        ("a photo of a cat", &[320, 1125, 539, 320, 2368]),
        (
            "A photo of sks person, oil painting",
            &[320, 1125, 539, 48136, 2533, 267, 2870, 3086],
        ),
        (
            "masterpiece, best quality, 1girl, (red hair:1.2), looking at viewer",
            &[
                12066, 267, 949, 3027, 267, 272, 1611, 267, 263, 736, 2225, 281, 272, 269, 273,
                2361, 1312, 536, 15061,
            ],
        ),
        (
            "Café naïve — don't   stop!!",
            &[15304, 1097, 35689, 563, 2005, 847, 713, 1691, 748],
        ),
    ];
    for (prompt, expected) in cases {
        assert_eq!(sd1.encode(prompt), expected, "{prompt}");
    }
    let tokens = sd1.tokenize("a photo of a cat", 3);
    assert_eq!(
        tokens.ids[..8],
        [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    );
    assert_eq!(tokens.ids.len(), WINDOW);
    // SD 2.x pads with `!` (0) after the end-of-text token.
    let sd2 = ClipTokenizer::bundled(Family::Sd2).tokenize("a photo of a cat", 3);
    assert_eq!(sd2.ids[..8], [49406, 320, 1125, 539, 320, 2368, 49407, 0]);
    assert!(sd2.ids[7..].iter().all(|&id| id == 0));
}

#[test]
fn long_prompts_are_split_into_windows_of_75() {
    let prompt: Vec<String> = (0..40).map(|i| format!("word{i} token")).collect();
    let prompt = prompt.join(", ");
    // "word" 2653, digits 0-9 are 271-280, "token" 17134, "," 267 (transformers' CLIPTokenizer).
    let expected: Vec<u32> = (0..40)
        .flat_map(|i: u32| {
            let digits = i
                .to_string()
                .bytes()
                .map(|b| 271 + (b - b'0') as u32)
                .collect::<Vec<_>>();
            let comma = if i < 39 { vec![267] } else { vec![] };
            [vec![2653], digits, vec![17134], comma].concat()
        })
        .collect();
    let sd1 = ClipTokenizer::bundled(Family::Sd1);
    assert_eq!(sd1.encode(&prompt), expected);
    assert_eq!(expected.len(), 189);
    let tokens = sd1.tokenize(&prompt, 3);
    assert_eq!((tokens.chunks(), tokens.dropped), (3, 0));
    for (i, window) in tokens.ids.chunks(WINDOW).enumerate() {
        let content = &expected[i * 75..expected.len().min((i + 1) * 75)];
        assert_eq!(window[0], 49406);
        assert_eq!(&window[1..1 + content.len()], content, "window {i}");
        assert!(
            window[1 + content.len()..].iter().all(|&id| id == 49407),
            "window {i}"
        );
    }
    let truncated = sd1.tokenize(&prompt, 2);
    assert_eq!((truncated.chunks(), truncated.dropped), (2, 39));
    // A batch pads shorter prompts with empty windows.
    let (ids, _) = sd1
        .tokenize_batch(&[&prompt, "a cat"], 3, &Device::Cpu)
        .unwrap();
    assert_eq!(ids.dims(), &[2, 3 * WINDOW]);
    let rows = ids.to_vec2::<u32>().unwrap();
    assert_eq!(rows[1][WINDOW..WINDOW + 3], [49406, 49407, 49407]);
}

#[test]
fn text_encoder_encodes_windows_separately() {
    let model = open_tiny(&fixture("sd1").join("diffusers"));
    let encoder = TextEncoder::new(
        model.text_encoder(),
        &model.text_encoder_config,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let ids = reference("sd1")["te.input_ids"].clone();
    let twice = Tensor::cat(&[&ids, &ids.flip(&[0]).unwrap()], 1).unwrap();
    let out = encoder.forward(&twice).unwrap();
    let single = encoder.forward(&ids).unwrap();
    assert_eq!(out.last.dims(), &[2, 2 * WINDOW, 32]);
    assert_eq!(
        max_abs_diff(&out.last.narrow(1, 0, WINDOW).unwrap(), &single.last),
        0.0
    );
    assert_eq!(max_abs_diff(&out.pooled, &single.pooled), 0.0);
}

// ---- what is refused, and how ----

fn open_err(path: &Path) -> CheckpointError {
    match checkpoint::open(path) {
        Ok(model) => panic!("{} opened as {}", path.display(), model.describe()),
        Err(e) => e,
    }
}

#[test]
fn loras_are_refused() {
    for name in ["lora_kohya.safetensors", "lora_peft.safetensors"] {
        let err = open_err(&fixture("sd1").join(name));
        assert!(matches!(err, CheckpointError::IsLora { .. }), "{err}");
        assert!(err.to_string().contains("is a LoRA"), "{err}");
    }
}

#[test]
fn damaged_files_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("sd1").join("single.safetensors")).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = open_err(&truncated);
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
    assert!(
        err.to_string().contains("truncated") && err.to_string().contains("Download it again"),
        "{err}"
    );

    let tiny = dir.path().join("tiny.safetensors");
    std::fs::write(&tiny, b"abc").unwrap();
    assert!(matches!(open_err(&tiny), CheckpointError::Corrupt { .. }));

    // Two f32 tensors of 4 bytes whose offsets overlap.
    let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#;
    let lying = dir.path().join("lying.safetensors");
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header.as_bytes());
    file.extend([0u8; 8]);
    std::fs::write(&lying, file).unwrap();
    let err = open_err(&lying);
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("inconsistent"), "{err}");

    let not_json = dir.path().join("text.safetensors");
    let mut file = 4u64.to_le_bytes().to_vec();
    file.extend(b"nope");
    std::fs::write(&not_json, file).unwrap();
    assert!(matches!(
        open_err(&not_json),
        CheckpointError::NotSafetensors { .. }
    ));
}

#[test]
fn pickles_are_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["model.ckpt", "model.pt", "model.bin"] {
        let path = dir.path().join(name);
        std::fs::write(&path, b"\x80\x02anything").unwrap();
        let err = open_err(&path);
        assert!(matches!(err, CheckpointError::Pickle { .. }), "{err}");
        assert!(
            err.to_string().contains("Convert it to .safetensors"),
            "{err}"
        );
    }
    // A zip (a torch.save pickle or a packed folder) renamed to .safetensors is recognised by its first bytes.
    let renamed = dir.path().join("renamed.safetensors");
    std::fs::write(&renamed, b"PK\x03\x04\x00\x00\x00\x00rest of a zip").unwrap();
    let err = open_err(&renamed);
    assert!(matches!(err, CheckpointError::Archive { .. }), "{err}");
    assert!(
        err.to_string().contains("convert it to .safetensors"),
        "{err}"
    );
}

/// Writes a safetensors file holding one small tensor per name.
fn keys_file(dir: &Path, file: &str, names: &[&str]) -> PathBuf {
    let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let tensors: HashMap<String, Tensor> =
        names.iter().map(|n| (n.to_string(), t.clone())).collect();
    let path = dir.join(file);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn other_model_families_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "sdxl.safetensors",
            vec![
                "conditioner.embedders.1.model.ln_final.weight",
                "model.diffusion_model.input_blocks.0.0.weight",
            ],
            "SDXL",
        ),
        (
            "flux.safetensors",
            vec!["double_blocks.0.img_attn.qkv.weight", "img_in.weight"],
            "FLUX",
        ),
        (
            "flux-diffusers.safetensors",
            vec!["transformer_blocks.0.attn.to_q.weight", "x_embedder.weight"],
            "FLUX",
        ),
        (
            "sd3.safetensors",
            vec!["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"],
            "SD3",
        ),
    ];
    for (file, names, family) in cases {
        let err = open_err(&keys_file(dir.path(), file, &names));
        assert!(matches!(err, CheckpointError::Unsupported { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains(family) && message.contains("not support yet"),
            "{message}"
        );
    }
    let unknown = open_err(&keys_file(
        dir.path(),
        "resnet.safetensors",
        &["fc.weight", "conv1.weight"],
    ));
    assert!(
        matches!(unknown, CheckpointError::NotStableDiffusion { .. }),
        "{unknown}"
    );
    let gguf = open_err(&dir.path().join("model.gguf"));
    assert!(
        matches!(gguf, CheckpointError::Unsupported { .. }),
        "{gguf}"
    );
}

#[test]
fn incomplete_checkpoints_say_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let all =
        candle_core::safetensors::load(fixture("sd1").join("single.safetensors"), &Device::Cpu)
            .unwrap();
    let without_vae: HashMap<String, Tensor> = all
        .into_iter()
        .filter(|(k, _)| !k.starts_with("first_stage_model."))
        .collect();
    let path = dir.path().join("no-vae.safetensors");
    candle_core::safetensors::save(&without_vae, &path).unwrap();
    let err = open_err(&path);
    assert!(err.to_string().contains("no VAE"), "{err}");
}

#[test]
fn folders_that_are_not_diffusers_models_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = open_err(dir.path());
    assert!(matches!(err, CheckpointError::NotDiffusers { .. }), "{err}");
    std::fs::write(
        dir.path().join("model_index.json"),
        r#"{"_class_name": "StableDiffusionXLPipeline"}"#,
    )
    .unwrap();
    let err = open_err(dir.path());
    assert!(err.to_string().contains("SDXL"), "{err}");
    std::fs::write(
        dir.path().join("model_index.json"),
        r#"{"_class_name": "StableDiffusionPipeline"}"#,
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("text_encoder")).unwrap();
    std::fs::copy(
        fixture("sd1").join("diffusers/text_encoder/config.json"),
        dir.path().join("text_encoder/config.json"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("unet")).unwrap();
    std::fs::write(
        dir.path().join("unet/diffusion_pytorch_model.bin"),
        b"\x80\x02",
    )
    .unwrap();
    let err = open_err(dir.path());
    assert!(matches!(err, CheckpointError::Pickle { .. }), "{err}");
}

#[test]
fn images_round_trip_through_tensors() {
    let image = image::RgbImage::from_fn(6, 4, |x, y| {
        image::Rgb([(x * 40) as u8, (y * 60) as u8, 255])
    });
    let tensor = lora_studio::model::vae::image_to_tensor(&image, &Device::Cpu).unwrap();
    assert_eq!(tensor.dims(), &[1, 3, 4, 6]);
    let values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(values.iter().all(|v| (-1.0..=1.0).contains(v)));
    let back = lora_studio::model::vae::tensor_to_images(&tensor).unwrap();
    assert_eq!(back, vec![image]);
}
