//! Every key of the training configuration is documented in docs/CONFIG.md (as `section.key`).

use lora_studio::schema;
use lora_studio::train::config::{SamplePrompt, TrainConfig};
use std::path::PathBuf;

/// Calls `visit` with the dotted name (`section.key`) of every value in `table`, tables and arrays included;
/// the tables of an array as `section.key[i]`.
fn walk(prefix: &str, table: &toml::Table, visit: &mut dyn FnMut(&str, &toml::Value)) {
    for (k, v) in table {
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        visit(&name, v);
        match v {
            toml::Value::Table(t) => walk(&name, t, visit),
            toml::Value::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    if let toml::Value::Table(t) = item {
                        walk(&format!("{name}[{i}]"), t, visit);
                    }
                }
            }
            _ => {}
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
    // Keys as the docs write them: the one prompt's fields as `sampling.prompts[].field`.
    let mut all = Vec::new();
    walk("", &table, &mut |name, v| {
        if !v.is_table() {
            all.push(name.replace("[0]", "[]"));
        }
    });
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
    let table = schema::markdown_table();
    assert!(
        docs.contains(&table),
        "docs/CONFIG.md must hold this table under \"Admitted values\":\n{table}"
    );
}

/// `TrainConfig::numbers` (what validation checks) lists exactly the numbers of the serialized config, each
/// with a range.
#[test]
fn every_number_is_checked_against_its_range() {
    let mut c = TrainConfig::default();
    c.sampling.prompts = vec![SamplePrompt::default(), SamplePrompt::default()];
    let mut leaves = Vec::new();
    walk("", &toml::Table::try_from(&c).unwrap(), &mut |name, v| {
        if (v.is_integer() || v.is_float()) && name != "schema" {
            leaves.push(name.to_owned());
        }
    });
    let mut checked: Vec<String> = c.numbers().into_iter().map(|(k, _, _)| k).collect();
    leaves.sort();
    checked.sort();
    assert_eq!(leaves, checked);
    for (key, field, _) in c.numbers() {
        assert!(field.bound.is_some(), "{key} has no range");
        assert_eq!(schema::field(&key), Some(field), "{key}");
    }
}
