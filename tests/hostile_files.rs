//! Hostile files, fed to the real binary (`train`, `sample`, `dataset check`) and to the engine functions the GUI
//! calls. Every case must end quickly (a run is killed after [`LIMIT`] and the test fails), without a panic,
//! with a non-zero exit, a message that names the file (and tensor or key) and says what to do, and nothing
//! written or left behind in the output folder. The damaged files are made here from the tiny SD fixtures.
//!
//! Checked (docs/HOSTILE_INPUT.md lists what each now says):
//! - not a regular file: a named pipe, `/dev/zero` (through a `.safetensors` link), a folder, a broken link, as
//!   checkpoint, `--config`, `lora-studio.toml`, caption, `--latents`, LoRA and `sample --out`;
//! - checkpoints: a zip, a 1-D `conv_in.weight`, a scalar, a 1-D `attn2.to_k`, BOOL/F8/I64 weights, a transposed
//!   resnet conv, NaN in `conv_in`; diffusers configs with `attention_head_dim` 0 or `[]`, short or empty block
//!   type lists, empty `transformer_layers_per_block`, VAE `scaling_factor` 0;
//! - LoRA files with NaN, inf or 1e308 weights or alpha;
//! - a JPEG that declares 65500×65500, a caption larger than a caption can be;
//! - resume states with a missing moment tensor, an absurd step, a mismatched adapter shape, NaN weights;
//! - temporary files of an interrupted save are removed on the next start;
//! - regularization folders that are missing, a file, empty, all broken, or inside the dataset folder.

mod common;

use common::cli::{refused, run, s, snapshot};
use common::sd_tiny::fixture;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

#[cfg(unix)]
fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

/// A stored tensor: dtype, shape and raw bytes.
type Raw = (Dtype, Vec<usize>, Vec<u8>);

fn read_raw(path: &Path) -> BTreeMap<String, Raw> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write_raw(path: &Path, tensors: &BTreeMap<String, Raw>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A copy of `source` at `dest` with `damage` applied to its tensors.
fn damaged(source: &Path, dest: &Path, damage: impl FnOnce(&mut BTreeMap<String, Raw>)) -> PathBuf {
    let mut t = read_raw(source);
    damage(&mut t);
    write_raw(dest, &t);
    dest.to_owned()
}

fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

const CONV_IN: &str = "model.diffusion_model.input_blocks.0.0.weight";
const TO_K: &str = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";
/// conv1 of the resnet that widens 16 channels to 24.
const WIDENING_CONV: &str = "model.diffusion_model.input_blocks.3.0.in_layers.2.weight";

/// A copy of the tiny SD1 diffusers folder whose `part/config.json` is edited by `edit`.
fn folder_with_config(
    root: &Path,
    part: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let src = fixture("sd1").join("diffusers");
    let dest = root.join(format!("model-{part}"));
    copy_dir(&src, &dest);
    let path = dest.join(part).join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    dest
}

fn copy_dir(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let to = dest.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn open_err(path: &Path) -> String {
    match lora_studio::model::checkpoint::open(path) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn damaged_checkpoints_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let single = fixture("sd1").join("single.safetensors");
    let d = |name: &str, damage: fn(&mut BTreeMap<String, Raw>)| {
        damaged(&single, &dir.path().join(name), damage)
    };
    let cases: Vec<(PathBuf, &str, &str)> = vec![
        (
            d("conv-1d.safetensors", |t| {
                t.get_mut(CONV_IN).unwrap().1 = vec![16 * 4 * 9]
            }),
            CONV_IN,
            "1-dimensional",
        ),
        (
            d("conv-scalar.safetensors", |t| {
                *t.get_mut(CONV_IN).unwrap() = (Dtype::F32, vec![], f32_bytes([1.0]))
            }),
            CONV_IN,
            "0-dimensional",
        ),
        (
            d("to-k-1d.safetensors", |t| {
                t.get_mut(TO_K).unwrap().1 = vec![16 * 32]
            }),
            TO_K,
            "1-dimensional",
        ),
        (
            d("bool.safetensors", |t| {
                let e = t.get_mut(CONV_IN).unwrap();
                *e = (Dtype::BOOL, e.1.clone(), vec![1u8; 16 * 4 * 9]);
            }),
            CONV_IN,
            "BOOL",
        ),
        (
            d("f8.safetensors", |t| {
                let e = t.get_mut(CONV_IN).unwrap();
                *e = (Dtype::F8_E4M3, e.1.clone(), vec![0u8; 16 * 4 * 9]);
            }),
            CONV_IN,
            "F8_E4M3",
        ),
        (
            d("i64.safetensors", |t| {
                let e = t.get_mut(CONV_IN).unwrap();
                *e = (Dtype::I64, e.1.clone(), vec![0u8; 8 * 16 * 4 * 9]);
            }),
            CONV_IN,
            "I64",
        ),
        (
            d("transposed.safetensors", |t| {
                t.get_mut(WIDENING_CONV).unwrap().1 = vec![16, 24, 3, 3]
            }),
            WIDENING_CONV,
            "transposed",
        ),
        (
            d("nan.safetensors", |t| {
                t.get_mut(CONV_IN).unwrap().2 = f32_bytes((0..16 * 4 * 9).map(|_| f32::NAN))
            }),
            CONV_IN,
            "NaN",
        ),
    ];
    for (path, tensor, what) in &cases {
        let err = open_err(path);
        for needle in [s(path), tensor, what, "download it again"] {
            assert!(
                err.contains(needle),
                "{}: `{needle}` missing: {err}",
                path.display()
            );
        }
    }
    // The same through the binary: `sample` refuses before it makes anything.
    let out = dir.path().join("out.png");
    let (path, tensor, _) = &cases[0];
    let o = run(&[
        "sample",
        "--model",
        s(path),
        "--prompt",
        "x",
        "--out",
        s(&out),
        "--steps",
        "1",
    ]);
    refused(&o, &[s(path), tensor, "download it again"]);
    assert!(!out.exists());
    let zip = dir.path().join("model.safetensors");
    std::fs::write(&zip, b"PK\x03\x04\x14\x00\x00\x00 a zip archive").unwrap();
    let o = run(&[
        "sample",
        "--model",
        s(&zip),
        "--prompt",
        "x",
        "--out",
        s(&out),
    ]);
    refused(&o, &[s(&zip), "zip archive", "unpack it"]);
}

#[test]
fn damaged_diffusers_configs_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, &str, Edit); 7] = [
        ("unet", "attention_head_dim", |j| {
            j["attention_head_dim"] = 0.into()
        }),
        ("unet", "attention_head_dim", |j| {
            j["attention_head_dim"] = serde_json::json!([])
        }),
        ("unet", "down_block_types", |j| {
            j["down_block_types"] = serde_json::json!([])
        }),
        ("unet", "up_block_types", |j| {
            j["up_block_types"] = serde_json::json!(["UpBlock2D"])
        }),
        ("unet", "transformer_layers_per_block", |j| {
            j["transformer_layers_per_block"] = serde_json::json!([])
        }),
        ("vae", "scaling_factor", |j| {
            j["scaling_factor"] = 0.0.into()
        }),
        ("text_encoder", "num_attention_heads", |j| {
            j["num_attention_heads"] = 0.into()
        }),
    ];
    for (i, (part, key, edit)) in cases.into_iter().enumerate() {
        let root = dir.path().join(i.to_string());
        let model = folder_with_config(&root, part, edit);
        let err = open_err(&model);
        let config = model.join(part).join("config.json");
        for needle in [s(&config), key, "download the model folder again"] {
            assert!(
                err.contains(needle),
                "{part} {key}: `{needle}` missing: {err}"
            );
        }
    }
}

#[cfg(unix)]
#[test]
fn what_is_not_a_regular_file_is_refused_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let fifo = root.join("pipe.safetensors");
    mkfifo(&fifo);
    let zero = root.join("zero.safetensors");
    symlink(Path::new("/dev/zero"), &zero);
    let broken = root.join("gone.safetensors");
    let target = root.join("moved-away.safetensors");
    symlink(&target, &broken);
    let out = root.join("out.png");
    for (model, needles) in [
        (&fifo, vec!["named pipe"]),
        (&zero, vec!["character device"]),
        (&broken, vec![s(&target), "fix the link"]),
    ] {
        let o = run(&[
            "sample",
            "--model",
            s(model),
            "--prompt",
            "x",
            "--out",
            s(&out),
        ]);
        let mut all = vec![s(model), "choose"];
        if model == &broken {
            all.pop();
        }
        all.extend(needles);
        refused(&o, &all);
    }
    // A diffusers folder whose config is a pipe.
    let model = root.join("model");
    copy_dir(&fixture("sd1").join("diffusers"), &model);
    let config = model.join("unet/config.json");
    std::fs::remove_file(&config).unwrap();
    mkfifo(&config);
    let o = run(&[
        "sample",
        "--model",
        s(&model),
        "--prompt",
        "x",
        "--out",
        s(&out),
    ]);
    refused(&o, &[s(&config), "named pipe"]);
    std::fs::remove_file(&config).unwrap();
    std::fs::copy(fixture("sd1").join("diffusers/unet/config.json"), &config).unwrap();
    // `--config` a pipe or /dev/zero; the output folder is never made.
    let data = root.join("data");
    common::engine::dataset(&data, 2);
    let output = root.join("output");
    let config_pipe = root.join("run.toml");
    mkfifo(&config_pipe);
    for config in [config_pipe.as_path(), Path::new("/dev/zero")] {
        let o = run(&[
            "train",
            "--config",
            s(config),
            "--model",
            s(&model),
            "--dataset",
            s(&data),
            "--output",
            s(&output),
        ]);
        refused(
            &o,
            &[s(config), "not a regular file", "choose another path"],
        );
    }
    assert!(!output.exists());
    // `--out` a device, `--latents` a pipe.
    let o = run(&[
        "sample",
        "--model",
        s(&model),
        "--prompt",
        "x",
        "--out",
        "/dev/null",
    ]);
    refused(&o, &["/dev/null", "character device", "file to write"]);
    let latents = root.join("latents.safetensors");
    mkfifo(&latents);
    let o = run(&[
        "sample",
        "--model",
        s(&model),
        "--prompt",
        "x",
        "--out",
        s(&out),
        "--latents",
        s(&latents),
    ]);
    refused(&o, &[s(&latents), "named pipe"]);
    assert!(!out.exists());
}

#[test]
fn regularization_folders_that_cannot_serve_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::engine::dataset(&data, 2);
    let out = dir.path().join("out");
    let model = common::engine::model();
    let train = |reg: &Path| {
        run(&[
            "train",
            "--model",
            s(&model),
            "--dataset",
            s(&data),
            "--output",
            s(&out),
            "--reg-folder",
            s(reg),
            "--set",
            "dataset.resolution=32",
        ])
    };
    let missing = dir.path().join("no-such-reg");
    let o = train(&missing);
    refused(
        &o,
        &[
            s(&missing),
            "does not exist",
            "`dataset.regularization_folder`",
            "Browse…",
        ],
    );
    let file = dir.path().join("reg.txt");
    std::fs::write(&file, "a woman").unwrap();
    refused(&train(&file), &[s(&file), "is a file, not a folder"]);
    let empty = dir.path().join("empty-reg");
    std::fs::create_dir_all(&empty).unwrap();
    refused(&train(&empty), &[s(&empty), "holds no images", "a woman"]);
    let broken = dir.path().join("broken-reg");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("r0.png"), b"not a png").unwrap();
    refused(
        &train(&broken),
        &[
            s(&broken),
            "None of the 1 images",
            "r0.png",
            "Replace the broken images",
        ],
    );
    let inside = data.join("reg");
    common::write_png(&inside.join("r0.png"), 40, 40, 9);
    refused(
        &train(&inside),
        &[
            "regularization folder is inside the dataset folder",
            "beside the dataset folder",
        ],
    );
    assert!(!out.exists(), "a refused run makes no output folder");
}

#[cfg(unix)]
#[test]
fn dataset_files_that_block_or_never_end_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::engine::dataset(&data, 2);
    let caption = data.join("img0.txt");
    std::fs::remove_file(&caption).unwrap();
    mkfifo(&caption);
    let zero_caption = data.join("img1.txt");
    std::fs::remove_file(&zero_caption).unwrap();
    symlink(Path::new("/dev/zero"), &zero_caption);
    let o = run(&["dataset", "check", s(&data)]);
    assert!(!o.text.contains("panicked"), "{}", o.text);
    for needle in ["img0.txt", "img1.txt", "named pipe", "character device"] {
        assert!(o.text.contains(needle), "`{needle}` missing:\n{}", o.text);
    }
    // The project file a pipe: the folder is refused, naming it.
    let project = data.join("lora-studio.toml");
    mkfifo(&project);
    let o = run(&["dataset", "check", s(&data)]);
    refused(&o, &[s(&project), "named pipe"]);
}

#[test]
fn oversized_images_and_captions_are_refused_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // A real 8×8 JPEG whose frame header declares 65500×65500.
    let jpeg = data.join("huge.jpg");
    common::write_jpeg(&jpeg, 8, 8, 1);
    let mut bytes = std::fs::read(&jpeg).unwrap();
    let sof = bytes
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline JPEG");
    bytes[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xDC, 0xFF, 0xDC]);
    std::fs::write(&jpeg, &bytes).unwrap();
    std::fs::write(jpeg.with_extension("txt"), "a photo").unwrap();
    let o = run(&["dataset", "check", s(&data)]);
    refused(&o, &["huge.jpg", "too large", "resize it"]);
    // A 2 MB one-word caption.
    let png = data.join("ok.png");
    common::write_png(&png, 64, 64, 2);
    std::fs::write(png.with_extension("txt"), "x".repeat(2 << 20)).unwrap();
    let o = run(&["dataset", "check", s(&data)]);
    assert!(!o.text.contains("panicked"), "{}", o.text);
    for needle in ["ok.txt", "more than a caption file can be"] {
        assert!(o.text.contains(needle), "`{needle}` missing:\n{}", o.text);
    }
}

#[test]
fn lora_files_with_non_finite_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("sd1").join("lora_kohya.safetensors");
    let keys: Vec<String> = read_raw(&source).keys().cloned().collect();
    let down = keys
        .iter()
        .find(|k| k.ends_with(".lora_down.weight"))
        .unwrap()
        .clone();
    let alpha = keys.iter().find(|k| k.ends_with(".alpha")).unwrap().clone();
    let model = fixture("sd1").join("diffusers");
    let out = dir.path().join("out.png");
    let modules = {
        let files = lora_studio::model::checkpoint::open(&model).unwrap();
        let mut unet = common::sd_tiny::load_unet(&files);
        common::sd_tiny::model_module_paths(&files, &mut unet)
    };
    for (i, (key, value)) in [
        (&down, f64::NAN),
        (&down, f64::INFINITY),
        (&alpha, f64::INFINITY),
        (&alpha, 1e308),
    ]
    .into_iter()
    .enumerate()
    {
        let path = damaged(
            &source,
            &dir.path().join(format!("bad{i}.safetensors")),
            |t| {
                let e = t.get_mut(key).unwrap();
                let n = e.1.iter().product::<usize>();
                // 1e308 only exists as f64: store the tensor as f64 throughout.
                *e = (
                    Dtype::F64,
                    e.1.clone(),
                    (0..n).flat_map(|_| value.to_le_bytes()).collect(),
                );
            },
        );
        let err = lora_studio::lora::load(&path, &modules)
            .err()
            .unwrap()
            .to_string();
        for needle in [
            s(&path),
            key.as_str(),
            "NaN or infinite",
            "pick another LoRA",
        ] {
            assert!(err.contains(needle), "`{needle}` missing: {err}");
        }
        if i == 0 {
            let lora = format!("{}:1.0", s(&path));
            let o = run(&[
                "sample",
                "--model",
                s(&model),
                "--lora",
                &lora,
                "--prompt",
                "x",
                "--out",
                s(&out),
            ]);
            refused(&o, &[s(&path), key, "NaN"]);
            assert!(!out.exists());
        }
    }
}

/// One CLI training step on the tiny model, leaving `output/state`.
fn trained_state(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (data, output) = (root.join("data"), root.join("output"));
    common::engine::dataset(&data, 2);
    let model = fixture("sd1").join("diffusers");
    let o = run(&[
        "train",
        "--model",
        s(&model),
        "--dataset",
        s(&data),
        "--output",
        s(&output),
        "--steps",
        "1",
        "--resolution",
        "32",
        "--batch-size",
        "2",
        "--rank",
        "2",
        "--set",
        "dataset.bucketing=false",
        "--set",
        "training.recompute=false",
        "--set",
        "sampling.every_n_steps=0",
    ]);
    assert_eq!(o.code, Some(0), "{}", o.text);
    let state = output.join("state");
    assert!(state.join("state.toml").is_file(), "{}", o.text);
    (data, output, state)
}

#[test]
fn damaged_resume_states_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let (data, output, state) = trained_state(dir.path());
    let model = fixture("sd1").join("diffusers");
    // An interrupted save's leftovers are cleaned up by the next start in the folder.
    std::fs::create_dir(output.join(".state-AbC123")).unwrap();
    std::fs::write(output.join(".lora-studio-x1.tmp"), b"half a file").unwrap();
    let optimizer = state.join("optimizer.safetensors");
    let adapters = state.join("adapters.safetensors");
    let pristine: Vec<(PathBuf, Vec<u8>)> = [&optimizer, &adapters, &state.join("state.toml")]
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(p).unwrap()))
        .collect();
    let restore = || {
        for (p, b) in &pristine {
            std::fs::write(p, b).unwrap();
        }
    };
    type Damage = Box<dyn Fn()>;
    let (opt, ad) = (optimizer.clone(), adapters.clone());
    let text = String::from_utf8(pristine[2].1.clone()).unwrap();
    let toml_path = state.join("state.toml");
    let cases: Vec<(Damage, PathBuf)> = vec![
        (
            Box::new(move || {
                damaged(&opt.clone(), &opt, |t| {
                    let k = t.keys().find(|k| k.ends_with(".1")).unwrap().clone();
                    t.remove(&k);
                });
            }),
            optimizer.clone(),
        ),
        (
            Box::new(move || {
                damaged(&ad.clone(), &ad, |t| {
                    let e = t.values_mut().next().unwrap();
                    let n = e.1.iter().product::<usize>();
                    e.2 = f32_bytes((0..n).map(|_| f32::NAN));
                });
            }),
            adapters.clone(),
        ),
        (
            Box::new(move || {
                let absurd = text.replacen("step = 1", "step = 18446744073709551615", 1);
                std::fs::write(&toml_path, absurd).unwrap();
            }),
            state.join("state.toml"),
        ),
    ];
    for (damage, file) in cases {
        restore();
        damage();
        let before = snapshot(&output);
        let o = run(&[
            "train",
            "--resume",
            s(&state),
            "--model",
            s(&model),
            "--dataset",
            s(&data),
            "--output",
            s(&output),
            "--steps",
            "2",
        ]);
        refused(&o, &[s(&file), "start a new run or pick another state"]);
        let after = snapshot(&output);
        let changed: Vec<_> = after
            .iter()
            .filter(|(p, m)| before.get(*p) != Some(m) && !p.starts_with(output.join("samples")))
            .map(|(p, _)| p)
            .collect();
        assert!(changed.is_empty(), "changed: {changed:?}\n{}", o.text);
    }
    assert!(
        !output.join(".state-AbC123").exists(),
        "staging folder removed"
    );
    assert!(
        !output.join(".lora-studio-x1.tmp").exists(),
        "temporary file removed"
    );
}
