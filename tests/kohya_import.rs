//! Importing a kohya config, as a user coming from kohya_ss would: `config import` writes a config that
//! `train --config` trains, `train --kohya-config` trains straight from the file, a file that is not a kohya
//! config is refused, and the training form's "Kohya config" row fills the form and lists what was not applied.

mod common;

use common::cli::{refused, run, s};
use common::engine::{dataset, model};
use common::gui::{harness, nav, type_into, wait_for};
use egui::accesskit::Role;
use egui_kittest::kittest::{NodeT, Queryable};
use lora_studio::app::AppState;
use lora_studio::train::config::TrainConfig;
use std::path::Path;

/// A kohya_ss GUI config for the tiny model: 1 step at 32 px, rank 4, the UNet alone, fp32 files named `t`,
/// with two settings lora-studio does not have.
fn kohya_json(data: &Path, out: &Path) -> String {
    serde_json::json!({
        "LoRA_type": "Standard",
        "pretrained_model_name_or_path": s(&model()),
        "train_data_dir": s(data),
        "output_dir": s(out),
        "output_name": "t",
        "max_resolution": "32,32",
        "enable_bucket": false,
        "network_dim": 4,
        "network_alpha": "2",
        "optimizer": "AdamW",
        "learning_rate": "0.002",
        "unet_lr": "0.002",
        "text_encoder_lr": "0",
        "lr_scheduler": "constant",
        "max_train_steps": "1",
        "train_batch_size": 2,
        "gradient_checkpointing": false,
        "mixed_precision": "no",
        "save_precision": "float",
        "cache_latents": true,
        "xformers": "xformers",
        "color_aug": true,
        "scale_weight_norms": 1.0
    })
    .to_string()
}

#[test]
fn an_imported_config_trains_and_so_does_the_kohya_file_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("data"), dir.path().join("out"));
    dataset(&data, 2);
    let file = dir.path().join("kohya.json");
    std::fs::write(&file, kohya_json(&data, &out)).unwrap();
    let written = dir.path().join("train.toml");

    let o = run(&[
        "config",
        "import",
        s(&file),
        "--preset",
        "cpu-demo",
        "--out",
        s(&written),
    ]);
    assert_eq!(o.code, Some(0), "{}", o.text);
    for needle in [
        "Not applied (2;",
        "color_aug = true: colour augmentation is not available",
        "scale_weight_norms = 1.0: max-norm regularization is not available",
    ] {
        assert!(
            o.text.contains(needle),
            "`{needle}` missing from:\n{}",
            o.text
        );
    }
    let c = TrainConfig::load(&written).unwrap();
    assert_eq!((c.network.rank, c.network.alpha), (4, 2.0));
    assert_eq!((c.dataset.resolution, c.training.steps), (32, 1));
    assert!(!c.training.train_text_encoder);
    // An existing --out is not replaced without --force.
    let o = run(&["config", "import", s(&file), "--out", s(&written)]);
    refused(&o, &["train.toml exists", "--force"]);

    let o = run(&["train", "--config", s(&written)]);
    assert_eq!(o.code, Some(0), "{}", o.text);
    assert!(out.join("t.safetensors").is_file(), "{}", o.text);

    std::fs::remove_dir_all(&out).unwrap();
    let o = run(&["train", "--preset", "cpu-demo", "--kohya-config", s(&file)]);
    assert_eq!(o.code, Some(0), "{}", o.text);
    assert!(o.text.contains("color_aug = true"), "{}", o.text);
    assert!(out.join("t.safetensors").is_file(), "{}", o.text);
}

#[test]
fn files_that_are_not_kohya_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("train.toml");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let array = write("array.json", "[{\"network_dim\": 8}]");
    let wrong = write(
        "wrong.json",
        "{\"network_dim\": \"abc\", \"learning_rate\": 1e-4}",
    );
    let junk = write("junk.txt", "this is = not [a config");
    for (path, needles) in [
        (array.as_path(), &["array.json is a JSON array"][..]),
        (
            wrong.as_path(),
            &["`network_dim` is \"abc\": it must be a whole number"],
        ),
        (
            junk.as_path(),
            &["neither a kohya_ss GUI config (JSON) nor an sd-scripts config"],
        ),
        (dir.path(), &["a folder", "choose another path"]),
        (Path::new("/dev/zero"), &["character device"]),
        (&dir.path().join("none.json"), &["does not exist"]),
    ] {
        let o = run(&["config", "import", s(path), "--out", s(&out)]);
        refused(&o, needles);
        assert!(!out.exists(), "{}: --out was written", path.display());
    }
    let o = run(&["train", "--kohya-config", s(&wrong)]);
    refused(&o, &["`network_dim` is \"abc\""]);
}

#[test]
fn the_training_form_imports_a_kohya_config_and_lists_what_it_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("data"), dir.path().join("out"));
    dataset(&data, 2);
    let file = dir.path().join("kohya.json");
    std::fs::write(&file, kohya_json(&data, &out)).unwrap();
    let mut h = harness(AppState::default());
    h.run_steps(4);
    nav(&mut h, "Training");

    // A file that is not a config: the error shows and nothing changes.
    let before = h.state().state().training.config.clone();
    type_into(&mut h, "Kohya config", &dir.path().to_string_lossy(), false);
    h.get_by_label("Import kohya config").click();
    wait_for(&mut h, "the refusal", 30, |app| {
        app.training().kohya_import().last().is_some()
    });
    assert!(
        h.query_by_label_contains("Cannot import: cannot read")
            .is_some()
    );
    assert_eq!(h.state().state().training.config, before);

    type_into(&mut h, "Kohya config", &file.to_string_lossy(), true);
    h.get_by_label("Import kohya config").click();
    wait_for(&mut h, "the import and the dataset it names", 60, |app| {
        let imported = app
            .training()
            .kohya_import()
            .last()
            .is_some_and(|r| r.is_ok());
        imported && !app.dataset().is_busy() && app.dataset().scan().is_some()
    });
    let c = &h.state().state().training.config;
    assert_eq!((c.network.rank, c.optimizer.lr), (4, 0.002));
    assert_eq!(c.model.checkpoint, model());
    assert_eq!(c.dataset.folder, data, "the Dataset workspace opened it");
    assert_eq!(h.state().state().training.preset, "sd15-6gb");
    assert!(h.query_by_label("Not applied (2)").is_some());
    assert!(
        h.query_by_label_contains("color_aug = true: colour augmentation")
            .is_some()
    );
    // The form shows the imported values.
    let rank = h.get_by_role_and_label(Role::TextInput, "Rank");
    assert_eq!(rank.accesskit_node().value().as_deref(), Some("4"));
}
