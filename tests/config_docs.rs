//! Every key of the training configuration is documented in docs/CONFIG.md (as `section.key`).

use lora_studio::train::config::{SamplePrompt, TrainConfig};
use std::path::PathBuf;

/// `section.key` for every key of the serialized config; array-of-table entries as `section.key[].field`.
fn keys(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
    for (k, v) in table {
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => keys(&name, t, out),
            toml::Value::Array(a) => {
                out.push(name.clone());
                if let Some(toml::Value::Table(t)) = a.first() {
                    keys(&format!("{name}[]"), t, out);
                }
            }
            _ => out.push(name),
        }
    }
}

#[test]
fn every_config_key_is_documented() {
    let mut config = TrainConfig::default();
    // Optional keys are left out of TOML when unset: set them so that they are listed too.
    config.model.vae = Some(PathBuf::from("vae.safetensors"));
    config.network.init_from = Some(PathBuf::from("lora.safetensors"));
    config.sampling.prompts.push(SamplePrompt::default());
    let table = toml::Table::try_from(&config).unwrap();
    let mut all = Vec::new();
    keys("", &table, &mut all);
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CONFIG.md")).unwrap();
    let missing: Vec<_> = all
        .iter()
        .filter(|k| !docs.contains(&format!("| `{k}` |")))
        .collect();
    assert!(all.len() > 40, "only {} keys found", all.len());
    assert!(missing.is_empty(), "not in docs/CONFIG.md: {missing:?}");
}

/// The ranges the config is checked against are the ones docs/CONFIG.md states (both come from the schema).
#[test]
fn the_admitted_values_table_is_the_schema() {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CONFIG.md")).unwrap();
    let table = lora_studio::schema::markdown_table();
    assert!(
        docs.contains(&table),
        "docs/CONFIG.md must hold this table under \"Admitted values\":\n{table}"
    );
}
