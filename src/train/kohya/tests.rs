use super::*;
use crate::train::config::{Precision, Prediction, SaveDtype, Targets, TrainConfig};
use crate::train::lr::LrSchedule;
use crate::train::optim::OptimizerKind;
use crate::train::presets;

const GUI_JSON: &str = include_str!("../../../tests/fixtures/kohya/sd15-lora.json");
const SCRIPTS_TOML: &str = include_str!("../../../tests/fixtures/kohya/sd-scripts.toml");

fn json(text: &str) -> Result<Imported, ConfigError> {
    parse(text, Path::new("kohya.json"))
}

/// The import laid over the `sd15-6gb` preset, as the CLI and the GUI lay it.
fn over_preset(imported: &Imported) -> TrainConfig {
    let preset = presets::find("sd15-6gb").unwrap();
    TrainConfig::build(
        &[("preset", &preset.layer), ("kohya", &imported.layer_text())],
        &[],
    )
    .unwrap()
}

fn keys(imported: &Imported) -> Vec<&str> {
    imported.skipped.iter().map(|s| s.key.as_str()).collect()
}

/// `{"network_dim": 8, "output_name": "x", <extra>}`.
fn small(extra: &str) -> Result<Imported, ConfigError> {
    json(&format!(
        "{{\"network_dim\": 8, \"output_name\": \"x\"{}{extra}}}",
        if extra.is_empty() { "" } else { ", " }
    ))
}

#[test]
fn a_kohya_ss_gui_config_maps_onto_our_keys() {
    let imported = json(GUI_JSON).unwrap();
    assert_eq!(imported.format, Format::GuiJson);
    let c = over_preset(&imported);
    assert_eq!(
        c.model.checkpoint,
        Path::new("/home/me/models/v1-5-pruned-emaonly.safetensors")
    );
    assert_eq!(c.model.clip_skip, 2);
    assert_eq!(c.model.prediction, Prediction::Auto);
    let d = &c.dataset;
    assert_eq!(d.folder, Path::new("/home/me/datasets/dog"));
    assert_eq!(
        d.regularization_folder.as_deref(),
        Some(Path::new("/home/me/datasets/dog-reg"))
    );
    assert_eq!(d.resolution, 576, "512×650 as a square of the same area");
    assert!(!d.bucketing);
    assert_eq!(
        (d.min_bucket_side, d.max_bucket_side, d.bucket_step),
        (256, 2048, 64)
    );
    assert_eq!(d.keep_tokens, 0);
    let n = &c.network;
    assert_eq!((n.rank, n.alpha), (64, 64.0));
    assert_eq!(
        n.targets,
        Targets::AttentionAndFeedForward,
        "Standard ignores conv_dim"
    );
    let o = &c.optimizer;
    assert_eq!(o.kind, OptimizerKind::AdamW8bit);
    assert_eq!((o.params.beta1, o.params.beta2), (0.9, 0.99));
    assert_eq!((o.params.eps, o.params.weight_decay), (1e-8, 0.1));
    assert_eq!((o.lr, o.lr_text_encoder), (1e-4, 5e-5));
    assert_eq!(o.schedule, LrSchedule::Constant);
    let preset = presets::find("sd15-6gb").unwrap().config().unwrap();
    assert_eq!(
        o.warmup_steps, preset.optimizer.warmup_steps,
        "lr_warmup is listed"
    );
    assert_eq!(
        c.saving.keep_last, 0,
        "save_last_n_steps 0 keeps every save"
    );
    let t = &c.training;
    assert!(t.train_text_encoder);
    assert_eq!((t.batch_size, t.steps, t.epochs), (3, 0, 1));
    assert_eq!(t.seed, 1234);
    assert_eq!(t.precision, Precision::Bf16);
    assert!(!t.recompute);
    assert_eq!(t.noise_offset, 0.05);
    let s = &c.saving;
    assert_eq!(s.output_dir, Path::new("/home/me/loras/zkdog"));
    assert_eq!(s.output_name, "zkdog-v1");
    assert_eq!((s.every_n_steps, s.every_n_epochs), (0, 1));
    assert_eq!(s.dtype, SaveDtype::Bf16);
    let p = &c.sampling;
    assert_eq!(p.every_n_steps, 250);
    assert_eq!(p.prompts.len(), 2);
    assert_eq!(p.prompts[0].prompt, "zkdog sitting on a beach");
    assert_eq!(p.prompts[0].negative, "lowres, blurry");
    let first = &p.prompts[0];
    assert_eq!((first.width, first.height, first.steps), (512, 640, 25));
    assert_eq!((first.cfg, first.seed), (7.0, 1234));
    assert_eq!(
        (p.prompts[1].steps, p.prompts[1].cfg, p.prompts[1].seed),
        (30, 7.5, 5)
    );
    // Only what changes a run is listed; "off" values and settings with no effect here are not.
    assert_eq!(
        keys(&imported),
        [
            "bucket_no_upscale",
            "lr_warmup",
            "max_resolution",
            "training_comment"
        ]
    );
    let res = &imported.skipped[2];
    assert_eq!(res.value, "\"512,650\"");
    assert!(res.why.contains("imported as 576"), "{}", res.why);
    assert!(
        imported.skipped[1].why.contains("warmup_steps"),
        "{:?}",
        imported.skipped[1]
    );
}

#[test]
fn an_sd_scripts_toml_in_sections_maps_onto_our_keys() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "# previews\nzkdog, photo --w 512 --h 768 --d 3 --ss euler_a\n",
    )
    .unwrap();
    let file = dir.path().join("config.toml");
    let text = SCRIPTS_TOML.replace("PROMPTS.txt", prompts.to_str().unwrap());
    std::fs::write(&file, &text).unwrap();
    let imported = read(&file).unwrap();
    assert_eq!(imported.format, Format::ScriptsToml);
    let c = over_preset(&imported);
    assert_eq!(c.dataset.folder, Path::new("/data/zkdog"));
    assert_eq!(c.dataset.caption_extension, ".caption");
    assert_eq!(c.dataset.resolution, 512);
    assert_eq!(
        (c.dataset.min_bucket_side, c.dataset.max_bucket_side),
        (320, 960)
    );
    assert!(c.dataset.flip && c.dataset.shuffle_caption);
    assert_eq!(c.dataset.tag_dropout, 0.05);
    let n = &c.network;
    assert_eq!(
        (n.rank, n.alpha),
        (32, 1.0),
        "sd-scripts' alpha when none is given"
    );
    assert_eq!(n.targets, Targets::All);
    assert_eq!((n.conv_rank, n.conv_alpha), (8, 4.0));
    let o = &c.optimizer;
    assert_eq!(o.kind, OptimizerKind::Prodigy);
    assert_eq!(o.lr, 1.0);
    assert_eq!((o.params.d_coef, o.params.weight_decay), (2.0, 0.01));
    assert!(o.params.use_bias_correction && o.params.safeguard_warmup);
    assert_eq!(o.params.beta2, 0.99);
    assert_eq!(o.schedule, LrSchedule::CosineWithRestarts);
    assert_eq!((o.restarts, o.warmup_steps), (3, 100), "5% of 2000 steps");
    let t = &c.training;
    assert!(!t.train_text_encoder, "network_train_unet_only");
    assert_eq!((t.steps, t.epochs, t.batch_size, t.seed), (2000, 0, 2, 7));
    assert_eq!(t.precision, Precision::Fp16);
    assert!(t.recompute);
    assert_eq!((t.noise_offset, t.min_snr_gamma), (0.0357, 5.0));
    assert_eq!((c.saving.every_n_steps, c.saving.keep_last), (500, 2));
    assert_eq!(c.sampling.prompts.len(), 1);
    let p = &c.sampling.prompts[0];
    assert_eq!(
        (p.prompt.as_str(), p.width, p.height, p.seed),
        ("zkdog, photo", 512, 768, 3)
    );
    assert_eq!(
        keys(&imported),
        [
            "color_aug",
            "network_args",
            "sample_prompts",
            "zero_terminal_snr"
        ]
    );
    assert_eq!(imported.skipped[1].value, "\"rank_dropout=0.1\"");
    assert_eq!(imported.skipped[2].value, "\"--ss euler_a\" (prompt 1)");
}

#[test]
fn optimizer_args_map_to_our_optimizer_keys_or_are_listed() {
    let i = small(
        "\"optimizer\": \"Adafactor\", \"optimizer_args\": \"scale_parameter=False relative_step=False \
         warmup_init=False eps=1e-30,1e-3 weight_decay=2 foo=1\"",
    )
    .unwrap();
    let c = over_preset(&i);
    assert_eq!(c.optimizer.kind, OptimizerKind::Adafactor);
    assert_eq!(
        c.optimizer.params.weight_decay, 0.0,
        "kohya's Adafactor default"
    );
    let listed: Vec<(&str, &str)> = (i.skipped.iter())
        .map(|s| (s.key.as_str(), s.value.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            ("optimizer_args", "\"eps=1e-30,1e-3\""),
            ("optimizer_args", "\"weight_decay=2\""),
            ("optimizer_args", "\"foo=1\"")
        ]
    );
    assert!(
        i.skipped[1].why.contains("from 0 to 1"),
        "{:?}",
        i.skipped[1]
    );
    // Without relative_step=False kohya's Adafactor picks its own step size: say so.
    let i = small("\"optimizer\": \"Adafactor\"").unwrap();
    assert_eq!(keys(&i), ["optimizer"]);
    assert!(i.skipped[0].why.contains("relative_step"));
    // Lion's defaults, then its args; an optimizer we lack keeps the preset's.
    let i =
        small("\"optimizer\": \"Lion8bit\", \"optimizer_args\": \"weight_decay=0.05\"").unwrap();
    let c = over_preset(&i);
    assert_eq!(c.optimizer.kind, OptimizerKind::Lion);
    assert_eq!(
        (c.optimizer.params.beta2, c.optimizer.params.weight_decay),
        (0.99, 0.05)
    );
    let i = small("\"optimizer\": \"DAdaptAdam\"").unwrap();
    assert_eq!(keys(&i), ["optimizer"]);
    assert_eq!(over_preset(&i).optimizer.kind, OptimizerKind::AdamW);
}

#[test]
fn learning_rates_decide_what_is_trained_as_kohya_does() {
    // The GUI: unet_lr alone trains the UNet alone; both 0 train both at learning_rate.
    let c = over_preset(
        &small("\"learning_rate\": 3e-4, \"unet_lr\": 3e-4, \"text_encoder_lr\": 0").unwrap(),
    );
    assert!(!c.training.train_text_encoder);
    assert_eq!(c.optimizer.lr, 3e-4);
    let c = over_preset(
        &small("\"learning_rate\": 2e-4, \"unet_lr\": 0, \"text_encoder_lr\": 0").unwrap(),
    );
    assert!(c.training.train_text_encoder);
    assert_eq!((c.optimizer.lr, c.optimizer.lr_text_encoder), (2e-4, 2e-4));
    // unet_lr over learning_rate, which is then listed as superseded.
    let i = small("\"learning_rate\": 1e-3, \"unet_lr\": 1e-4, \"text_encoder_lr\": 5e-5").unwrap();
    assert_eq!(over_preset(&i).optimizer.lr, 1e-4);
    assert_eq!(keys(&i), ["learning_rate"]);
    // sd-scripts: no text_encoder_lr trains the text encoder at learning_rate.
    let toml = "network_dim = 8\nlearning_rate = 1e-4\n";
    let c = over_preset(&parse(toml, Path::new("c.toml")).unwrap());
    assert!(c.training.train_text_encoder);
    assert_eq!(c.optimizer.lr_text_encoder, 1e-4);
    // The GUI trains the text encoder alone when only its rate is set; we train the UNet anyway.
    let i = small("\"learning_rate\": 1e-4, \"text_encoder_lr\": 5e-5").unwrap();
    assert_eq!(keys(&i), ["text_encoder_lr"]);
    assert!(i.skipped[0].why.contains("always trains the UNet"));
    // Prodigy's rates of 1 for both networks apply.
    let i = small("\"unet_lr\": 1.0, \"text_encoder_lr\": 1.0").unwrap();
    let c = over_preset(&i);
    assert!(c.training.train_text_encoder);
    assert_eq!((c.optimizer.lr, c.optimizer.lr_text_encoder), (1.0, 1.0));
    assert!(keys(&i).is_empty(), "{:?}", keys(&i));
}

#[test]
fn steps_epochs_and_warmup_follow_kohya() {
    let c =
        over_preset(&small("\"max_train_steps\": 1500, \"epoch\": 1, \"lr_warmup\": 10").unwrap());
    assert_eq!((c.training.steps, c.training.epochs), (1500, 0));
    assert_eq!(c.optimizer.warmup_steps, 150, "10% of 1500");
    let i = small("\"max_train_steps\": 1500, \"max_train_epochs\": 12, \"epoch\": 4").unwrap();
    let c = over_preset(&i);
    assert_eq!((c.training.steps, c.training.epochs), (0, 12));
    assert_eq!(keys(&i), ["epoch", "max_train_steps"]);
    let c = over_preset(&small("\"lr_warmup\": 10, \"lr_warmup_steps\": 40").unwrap());
    assert_eq!(c.optimizer.warmup_steps, 40);
    let c = over_preset(&small("\"lr_warmup\": \"0\"").unwrap());
    assert_eq!(c.optimizer.warmup_steps, 0, "not the preset's warmup");
    let c =
        over_preset(&small("\"lr_scheduler\": \"polynomial\", \"lr_scheduler_power\": 1").unwrap());
    assert_eq!(c.optimizer.schedule, LrSchedule::Linear);
}

#[test]
fn locon_types_train_the_convolutions_and_other_types_are_listed() {
    let c = over_preset(
        &small("\"LoRA_type\": \"LyCORIS/LoCon\", \"conv_dim\": 16, \"conv_alpha\": 8").unwrap(),
    );
    assert_eq!(c.network.targets, Targets::All);
    assert_eq!((c.network.conv_rank, c.network.conv_alpha), (16, 8.0));
    let i =
        small("\"LoRA_type\": \"LyCORIS/LoHa\", \"conv_dim\": 16, \"use_tucker\": true").unwrap();
    assert_eq!(keys(&i), ["LoRA_type"]);
    assert_eq!(
        over_preset(&i).network.targets,
        Targets::AttentionAndFeedForward
    );
}

#[test]
fn values_out_of_our_range_are_listed_and_the_rest_applies() {
    let i = small(
        "\"network_alpha\": 16, \"clip_skip\": 4, \"learning_rate\": 1e308, \"train_batch_size\": -2, \
         \"max_resolution\": \"8192,8192\", \"v_parameterization\": true, \"sdxl\": true",
    )
    .unwrap();
    assert_eq!(
        keys(&i),
        [
            "clip_skip",
            "learning_rate",
            "max_resolution",
            "sdxl",
            "train_batch_size"
        ]
    );
    assert!(
        i.skipped[0]
            .why
            .contains("`model.clip_skip` admits a whole number from 0 to 2")
    );
    let c = over_preset(&i);
    assert_eq!((c.network.rank, c.network.alpha), (8, 16.0));
    assert_eq!(c.model.prediction, Prediction::V);
    assert_eq!(
        c.optimizer.lr,
        presets::find("sd15-6gb")
            .unwrap()
            .config()
            .unwrap()
            .optimizer
            .lr
    );
}

#[test]
fn hostile_values_are_refused_naming_the_key() {
    for (extra, needle) in [
        (
            "\"network_dim\": \"abc\"",
            "`network_dim` is \"abc\": it must be a whole number",
        ),
        (
            "\"network_dim\": 8.5",
            "`network_dim` is 8.5: it must be a whole number",
        ),
        (
            "\"network_dim\": 1e300",
            "`network_dim` is 1e+300: it must be a whole number below 2^64",
        ),
        (
            "\"max_train_steps\": 99999999999999999999999",
            "`max_train_steps`",
        ),
        (
            "\"learning_rate\": \"NaN\"",
            "`learning_rate` is \"NaN\": it must be a finite number",
        ),
        ("\"learning_rate\": \"inf\"", "`learning_rate` is \"inf\""),
        (
            "\"network_alpha\": {\"x\": 1}",
            "`network_alpha` is {\"x\":1}: it must be a number",
        ),
        (
            "\"enable_bucket\": \"yes\"",
            "`enable_bucket` is \"yes\": it must be true or false",
        ),
        (
            "\"train_data_dir\": 5",
            "`train_data_dir` is 5: it must be text",
        ),
        ("\"max_resolution\": \"big\"", "`max_resolution` is \"big\""),
        (
            "\"optimizer_args\": \"weight_decay\"",
            "`optimizer_args` is \"weight_decay\": it must be key=value",
        ),
        (
            "\"optimizer_args\": \"weight_decay=nan\"",
            "`optimizer_args` is \"weight_decay=nan\"",
        ),
        ("\"optimizer_args\": [1, 2]", "`optimizer_args` is [1,2]"),
    ] {
        let e = small(extra).unwrap_err().0;
        assert!(e.starts_with("kohya.json: "), "{extra}: {e}");
        assert!(e.contains(needle), "{extra}: {e}");
    }
    let e = parse("learning_rate = nan\n", Path::new("c.toml"))
        .unwrap_err()
        .0;
    assert!(e.contains("`learning_rate` is \"NaN\""), "{e}");
}

#[test]
fn files_that_are_not_kohya_configs_say_what_they_are() {
    for (text, name, needle) in [
        ("[1, 2]", "a.json", "is a JSON array, not a kohya_ss config"),
        ("[1, 2]", "a", "is a JSON array"),
        ("\"text\"", "a.json", "is a JSON string"),
        ("{\"a\": ", "a.json", "is not valid JSON"),
        (
            "not = [toml",
            "a.toml",
            "neither a kohya_ss GUI config (JSON) nor an sd-scripts config",
        ),
        ("{}", "a.json", "has no kohya training settings"),
        ("", "a.toml", "has no kohya training settings"),
        (
            "schema = 1\n[model]\ncheckpoint = \"x\"\n",
            "a.toml",
            "is a lora-studio config",
        ),
        (
            "[general]\nshuffle_caption = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"x\"\n",
            "d.toml",
            "is an sd-scripts dataset config",
        ),
    ] {
        let e = parse(text, Path::new(name)).unwrap_err().0;
        assert!(e.starts_with(name) && e.contains(needle), "{text:?}: {e}");
    }
    // A UTF-8 byte-order mark (Windows editors) is not a problem.
    assert!(json("\u{feff}{\"network_dim\": 4}").is_ok());
}
