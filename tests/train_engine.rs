//! The training engine end to end on the CPU with the tiny SD1 fixture model: runs, saves, samples, resumes,
//! obeys commands and fails with advice on bad input.

mod common;

use candle_core::{DType, Device, Tensor};
use common::engine::{config, dataset, finished, model, run, start};
use lora_studio::train::config::TrainConfig;
use lora_studio::train::{Command, Event, StartOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::sd_tiny::max_abs(&(a - b).unwrap())
}

#[test]
fn a_run_saves_samples_and_changes_every_adapter_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, 4);
    let prompt = "sampling.prompts=[{prompt=\"zk\", width=32, height=32, steps=3, seed=5}]";
    let extra = [
        prompt,
        "sampling.every_n_steps=4",
        "saving.every_n_steps=4",
        "saving.keep_last=1",
        "training.train_text_encoder=true",
    ];
    // Stopped before the first step: the LoRA as initialised.
    let init_out = dir.path().join("init");
    let events = run(
        config(&data, &init_out, 8, &extra),
        StartOptions {
            stop_after: Some(0),
            ..Default::default()
        },
    );
    assert_eq!(finished(&events), (0, true));
    let init = tensors(&init_out.join("t-step0.safetensors"));

    let out = dir.path().join("out");
    let events = run(config(&data, &out, 8, &extra), StartOptions::default());
    assert_eq!(finished(&events), (8, false));
    let steps: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(s) => Some(s.step),
            _ => None,
        })
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    let drawn: Vec<(u64, bool)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Sample { info, .. } => Some((info.step, info.baseline)),
            _ => None,
        })
        .collect();
    assert_eq!(
        drawn,
        [(0, true), (4, false), (8, false)],
        "the baseline without the LoRA, then samples at steps 4 and 8"
    );
    let samples: Vec<&PathBuf> = events
        .iter()
        .filter_map(|e| match e {
            Event::Sample { path, .. } => Some(path),
            _ => None,
        })
        .collect();
    assert!(
        samples
            .iter()
            .all(|p| image::open(p).unwrap().width() == 32)
    );

    let lora = out.join("t.safetensors");
    let trained = tensors(&lora);
    assert_eq!(trained.len(), init.len());
    let mut adapters = 0;
    for (name, t) in &trained {
        if name.ends_with(".alpha") {
            continue;
        }
        adapters += 1;
        assert!(
            max_diff(t, &init[name]) > 0.0,
            "{name} did not change in training"
        );
    }
    let te = trained.keys().filter(|k| k.starts_with("lora_te_")).count();
    assert!(
        adapters > 20 && te > 0,
        "{adapters} adapter tensors, {te} of the text encoder"
    );
    // keep_last = 1: the step-4 file gave way to nothing newer than it before the end, so it stays alone.
    let step_files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("t-step"))
        .collect();
    assert_eq!(step_files, ["t-step4.safetensors"]);
    assert!(out.join("state/state.toml").is_file());

    let bytes = std::fs::read(&lora).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["ss_steps"], "8");
    assert_eq!(meta["ss_network_dim"], "4");
    assert_eq!(meta["ss_base_model_version"], "sd_v1");
    assert!(
        meta["ss_tag_frequency"].contains("\"zk\":4"),
        "{}",
        meta["ss_tag_frequency"]
    );
    assert!(meta["ss_dataset_dirs"].contains("\"img_count\":4"));
}

/// The loss on the training image, at fixed timesteps and noise, with and without the trained LoRA.
fn eval_losses(data: &Path, lora: &Path) -> (f32, f32) {
    use lora_studio::model::adapters::{Attach, attach};
    use lora_studio::model::text_encoder::TextEncoder;
    use lora_studio::model::unet::{UNet, UNetOptions};
    use lora_studio::model::vae::Vae;
    use lora_studio::sample::{NoiseSchedule, initial_noise};
    use lora_studio::train::data::{Item, load_for_bucket};
    use lora_studio::train::step::{LossOptions, diffusion_loss};
    let dev = Device::Cpu;
    let files = lora_studio::model::checkpoint::open(&model()).unwrap();
    let item = Item {
        path: data.join("img0.png"),
        caption: "zk, thing 0, red".into(),
        repeats: 1,
        bucket: (32, 32),
        regularization: false,
    };
    let vae = Vae::new(files.vae(), &files.vae_config, DType::F32, &dev).unwrap();
    let pixels = load_for_bucket(&item, false, &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let latents = vae.scale(&vae.encode(&pixels).unwrap().mean).unwrap();
    let tokenizer = lora_studio::sample::pipeline::tokenizer_for(&model(), files.family).unwrap();
    let te = TextEncoder::new(
        files.text_encoder(),
        &files.text_encoder_config,
        DType::F32,
        &dev,
    )
    .unwrap();
    let (ids, _) = tokenizer.tokenize_batch(&[&item.caption], 3, &dev).unwrap();
    let context = te.forward(&ids).unwrap().context(1).unwrap().clone();
    let loss_of = |unet: &UNet| {
        let mut total = 0.0;
        for (i, t) in [50usize, 200, 400, 600, 800].into_iter().enumerate() {
            let noise = initial_noise(100 + i as u64, latents.dims(), &dev).unwrap();
            let opts = LossOptions {
                prediction: files.prediction,
                min_snr_gamma: 0.0,
                prior_loss_weight: 1.0,
            };
            let l = diffusion_loss(
                unet,
                &NoiseSchedule::stable_diffusion(),
                opts,
                &latents,
                &context,
                &[t],
                &noise,
            )
            .unwrap();
            total += l.to_scalar::<f32>().unwrap();
        }
        total / 5.0
    };
    let load = || {
        UNet::load(
            files.unet(),
            &files.unet_config,
            UNetOptions::default(),
            DType::F32,
            &dev,
        )
        .unwrap()
    };
    let base = load();
    let mut tuned = load();
    let known = tuned.module_paths().unwrap();
    let (set, report) = lora_studio::lora::load(lora, &known).unwrap();
    assert!(report.unmatched.is_empty(), "{:?}", report.unmatched);
    attach(
        tuned.layers_mut().unwrap(),
        &set,
        "unet",
        1.0,
        Attach::Unmerged,
    )
    .unwrap();
    (loss_of(&base), loss_of(&tuned))
}

#[test]
fn the_loss_falls_when_overfitting_one_image() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, 1);
    let out = dir.path().join("out");
    // Tag shuffling keeps the text encoder on the device (frozen) and encodes every step.
    let extra = [
        "dataset.shuffle_caption=true",
        "training.batch_size=1",
        "optimizer.lr=5e-3",
        "dataset.caption_dropout=0.0",
    ];
    let events = run(config(&data, &out, 40, &extra), StartOptions::default());
    assert_eq!(finished(&events), (40, false));
    let (base, tuned) = eval_losses(&data, &out.join("t.safetensors"));
    eprintln!("loss on the training image: base {base:.4}, with the LoRA {tuned:.4}");
    assert!(tuned < 0.8 * base, "base {base}, tuned {tuned}");
}

/// `network.dropout` reaches the training forward: the same run with it on trains a different adapter.
#[test]
fn adapter_dropout_changes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, 3);
    let mut finals = Vec::new();
    for (name, p) in [("plain", "0.0"), ("dropout", "0.5")] {
        let out = dir.path().join(name);
        let set = format!("network.dropout={p}");
        assert_eq!(
            finished(&run(
                config(&data, &out, 3, &[&set]),
                StartOptions::default()
            )),
            (3, false)
        );
        finals.push(tensors(&out.join("t.safetensors")));
    }
    let diff = finals[0]
        .iter()
        .map(|(k, a)| max_diff(a, &finals[1][k]))
        .fold(0f32, f32::max);
    assert!(
        diff > 1e-6,
        "dropout 0.5 trained the same adapter (max diff {diff})"
    );
}

#[test]
fn resume_gives_the_same_adapter_as_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, 5);
    // Varied captions through a trained text encoder, mirroring, accumulation, a schedule, and adapter dropout
    // under recompute (whose repeated forward must draw the same masks): all must resume.
    let extra = [
        "network.dropout=0.2",
        "training.recompute=true",
        "dataset.shuffle_caption=true",
        "dataset.flip=true",
        "optimizer.gradient_accumulation=2",
        "optimizer.schedule=\"cosine\"",
        "optimizer.warmup_steps=2",
        "training.noise_offset=0.05",
        "training.train_text_encoder=true",
    ];
    let whole = dir.path().join("whole");
    assert_eq!(
        finished(&run(
            config(&data, &whole, 7, &extra),
            StartOptions::default()
        )),
        (7, false)
    );
    let parts = dir.path().join("parts");
    let second = stopped_and_resumed(&config(&data, &parts, 7, &extra), 3);
    let first_step = second.iter().find_map(|e| match e {
        Event::Progress(s) => Some(s.step),
        _ => None,
    });
    assert_eq!(first_step, Some(4), "the resumed run continues at step 4");
    assert_same_lora(&whole, &parts, "resumed");
}

/// Runs `config` stopped after `stop_at` steps, then resumed from its state to its end; the resumed run's events.
fn stopped_and_resumed(config: &TrainConfig, stop_at: u64) -> Vec<Event> {
    let stop = StartOptions {
        stop_after: Some(stop_at),
        ..Default::default()
    };
    assert_eq!(finished(&run(config.clone(), stop)), (stop_at, true));
    let resume = StartOptions {
        resume: Some(config.saving.output_dir.join("state")),
        ..Default::default()
    };
    let events = run(config.clone(), resume);
    assert_eq!(finished(&events), (config.training.steps, false));
    events
}

/// The LoRA `t.safetensors` in `a` and in `b` hold the same tensors (to 1e-6); `what` names the case.
fn assert_same_lora(a: &Path, b: &Path, what: &str) -> HashMap<String, Tensor> {
    let (a, b) = (
        tensors(&a.join("t.safetensors")),
        tensors(&b.join("t.safetensors")),
    );
    for (name, t) in &a {
        let d = max_diff(t, &b[name]);
        assert!(d <= 1e-6, "{what}: {name} differs by {d}");
    }
    a
}

/// The optimizers users pick train the adapters and resume exactly: a run stopped at step 2 and resumed ends with
/// the adapter of an uninterrupted run. Rank 64 gives the feed-forward adapters enough values for 8-bit moments,
/// which the saved state then holds.
#[test]
fn every_optimizer_trains_and_resumes_exactly() {
    for (kind, lr) in [("adamw_8bit", "2e-3"), ("prodigy", "1.0"), ("lion", "3e-4")] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        dataset(&data, 4);
        let extra = [
            format!("optimizer.kind=\"{kind}\""),
            format!("optimizer.lr={lr}"),
            "network.rank=64".into(),
            "network.alpha=64.0".into(),
        ];
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let whole = dir.path().join("whole");
        let events = run(config(&data, &whole, 4, &extra), StartOptions::default());
        assert_eq!(finished(&events), (4, false), "{kind}");
        if kind == "adamw_8bit" {
            let state = tensors(&whole.join("state").join("optimizer.safetensors"));
            assert!(
                state.values().any(|t| t.dtype() == DType::U8),
                "no 8-bit moments in the state"
            );
        }
        let parts = dir.path().join("parts");
        stopped_and_resumed(&config(&data, &parts, 4, &extra), 2);
        let a = assert_same_lora(&whole, &parts, kind);
        let mut moved = 0;
        for (name, t) in &a {
            moved += usize::from(
                name.ends_with("lora_up.weight") && max_diff(t, &t.zeros_like().unwrap()) > 0.0,
            );
        }
        let ups = a.keys().filter(|k| k.ends_with("lora_up.weight")).count();
        assert_eq!(
            moved, ups,
            "{kind}: every up-projection trains away from zero"
        );
    }
}

/// Regularization images from a kohya folder train in the same batches as the dataset's: an epoch takes twice the
/// steps, the loss stays finite under the prior loss weight and min-SNR-γ, a resumed run repeats the whole one,
/// and the LoRA records them as kohya does.
#[test]
fn regularization_images_double_the_epoch_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, 2);
    let reg = dir.path().join("reg");
    for i in 0..3u64 {
        let p = reg.join(format!("1_thing/r{i}.png"));
        common::write_png(&p, 40, 40, 50 + i);
        common::caption(&p, b"a thing");
    }
    let folder = format!("dataset.regularization_folder={:?}", reg.to_str().unwrap());
    let extra = [
        folder.as_str(),
        "dataset.prior_loss_weight=0.5",
        "training.min_snr_gamma=5.0",
    ];
    let plain = lora_studio::train::plan::load_data(&config(&data, &dir.path().join("x"), 4, &[]));
    let plain_steps = plain.unwrap().plan.steps_per_epoch();
    let whole = dir.path().join("whole");
    let events = run(config(&data, &whole, 4, &extra), StartOptions::default());
    assert_eq!(finished(&events), (4, false));
    let plan = events.iter().find_map(|e| match e {
        Event::Plan(p) => Some(p.clone()),
        _ => None,
    });
    let plan = plan.unwrap();
    assert_eq!(
        (plan.images, plan.regularization_images),
        (2, 2),
        "{plan:?}"
    );
    assert_eq!(
        (
            plan.samples_per_epoch,
            plan.regularization_samples_per_epoch
        ),
        (4, 2)
    );
    assert_eq!(plan.steps_per_epoch, 2 * plain_steps);
    let warned = events.iter().any(|e| {
        matches!(e, Event::Warning { message } if message.contains("1 of the 3 readable regularization images are not used"))
    });
    assert!(warned, "the unused third image is reported: {events:#?}");
    for e in &events {
        if let Event::Progress(s) = e {
            assert!(
                s.loss.is_finite() && s.loss > 0.0,
                "step {}: loss {}",
                s.step,
                s.loss
            );
        }
    }
    let parts = dir.path().join("parts");
    stopped_and_resumed(&config(&data, &parts, 4, &extra), 3);
    assert_same_lora(&whole, &parts, "regularization");
    let bytes = std::fs::read(whole.join("t.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["ss_num_train_images"], "2");
    assert_eq!(meta["ss_num_reg_images"], "2");
    assert_eq!(meta["ss_prior_loss_weight"], "0.5");
    assert_eq!(
        meta["ss_reg_dataset_dirs"],
        r#"{"1_thing":{"img_count":2,"n_repeats":1}}"#
    );
    assert!(!meta["ss_tag_frequency"].contains("a thing"));
}

#[test]
fn commands_pause_sample_save_resume_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, 2);
    let out = dir.path().join("out");
    let prompt = "sampling.prompts=[{prompt=\"zk\", width=32, height=32, steps=2}]";
    let engine = start(
        config(&data, &out, 10_000, &[prompt]),
        StartOptions::default(),
    );
    let next = |want: &dyn Fn(&Event) -> bool| loop {
        let e = engine
            .events()
            .recv_timeout(Duration::from_secs(120))
            .expect("an event");
        assert!(!matches!(e, Event::Failed { .. }), "{e:?}");
        if want(&e) {
            return e;
        }
    };
    next(&|e| matches!(e, Event::Progress(_)));
    engine.send(Command::Pause);
    next(&|e| matches!(e, Event::Paused));
    engine.send(Command::SampleNow);
    next(&|e| matches!(e, Event::Sample { .. }));
    engine.send(Command::SaveNow);
    let saved = next(&|e| matches!(e, Event::Saved { .. }));
    let Event::Saved {
        path, final_file, ..
    } = saved
    else {
        unreachable!()
    };
    assert!(path.is_file() && !final_file);
    engine.send(Command::Resume);
    next(&|e| matches!(e, Event::Resumed));
    next(&|e| matches!(e, Event::Progress(_)));
    engine.send(Command::Stop);
    let end = next(&|e| e.is_terminal());
    let Event::Finished { stopped, lora, .. } = end else {
        unreachable!()
    };
    assert!(stopped && lora.unwrap().is_file());
    assert!(out.join("state/adapters.safetensors").is_file());
    engine.join();
}

fn failure(config: TrainConfig) -> (String, String) {
    match run(config, StartOptions::default()).pop().unwrap() {
        Event::Failed { message, hint } => (message, hint),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn bad_input_ends_with_what_happened_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, 2);
    let out = dir.path().join("out");

    let mut c = config(&data, &out, 5, &[]);
    c.model.checkpoint = dir.path().join("missing.safetensors");
    let (m, h) = failure(c);
    assert!(m.contains("does not exist") || m.contains("missing"), "{m}");
    assert!(h.contains("checkpoint"), "{h}");

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (m, h) = failure(config(&empty, &out, 5, &[]));
    assert!(m.contains("no images"), "{m}");
    assert!(!h.is_empty());

    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for i in 0..3 {
        std::fs::write(broken.join(format!("b{i}.png")), b"not a png").unwrap();
    }
    let (m, h) = failure(config(&broken, &out, 5, &[]));
    assert!(m.contains("can be read"), "{m}");
    assert!(h.contains("Problems"), "{h}");

    let (m, h) = failure(config(&data, &out, 5, &["training.batch_size=3"]));
    assert!(m.contains("larger than every bucket"), "{m}");
    assert!(h.contains("training.batch_size"), "{h}");

    let lora_files = std::fs::read_dir(&out)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "safetensors")
            })
            .count()
        })
        .unwrap_or(0);
    assert_eq!(lora_files, 0, "failed runs leave no LoRA files");
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lora-studio"))
        .args(args)
        .output()
        .unwrap()
}

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn the_train_command_stops_resumes_and_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, 3);
    let out = dir.path().join("out");
    let (m, d, o) = (
        model().to_str().unwrap().to_owned(),
        data.to_str().unwrap().to_owned(),
        out.to_str().unwrap().to_owned(),
    );
    let base = [
        "train",
        "--json",
        "--preset",
        "cpu-demo",
        "--model",
        &m,
        "--dataset",
        &d,
        "--output",
        &o,
        "--name",
        "c",
        "--steps",
        "4",
        "--resolution",
        "32",
        "--batch-size",
        "1",
        "--rank",
        "2",
        "--set",
        "dataset.bucketing=false",
        "--sample-every",
        "0",
    ];
    let first = cli(&[&base[..], &["--stop-after", "2"]].concat());
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let events = json_lines(&first);
    let progress: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["event"] == "progress").collect();
    assert_eq!(progress.len(), 2);
    for key in ["step", "epoch", "loss", "lr"] {
        assert!(progress[0][key].is_number(), "{key} in {}", progress[0]);
    }
    let saved = events.iter().find(|e| e["event"] == "saved").unwrap();
    assert!(
        saved["path"]
            .as_str()
            .unwrap()
            .ends_with("c-step2.safetensors")
    );
    assert_eq!(events.last().unwrap()["stopped"], true);

    let state = out.join("state");
    let second = cli(&["train", "--json", "--resume", state.to_str().unwrap()]);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let events = json_lines(&second);
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "progress")
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [3, 4]);
    assert!(out.join("c.safetensors").is_file());

    let bad = cli(&["train", "--preset", "sd15-4gb"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("sd15-6gb"));
    let bad = cli(&["train", "--set", "network.rnak=3"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("rnak"));
    let missing = cli(&["train", "--dataset", &d, "--output", &o]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("base model"));
}
