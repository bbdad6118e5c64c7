//! Importing a kohya training config: the JSON the kohya_ss GUI saves (flat keys such as `LoRA_type`,
//! `max_resolution`, `lr_warmup` in percent) or an sd-scripts `--config_file` TOML (argument names, flat or in
//! tables such as `[training_arguments]`). What has a lora-studio equivalent becomes a config layer, laid over the
//! defaults or a preset by `TrainConfig::build` so that the config's own checks apply; every other setting that
//! would change a run is listed with the reason it was not applied. Values of the wrong type, NaN and numbers no
//! setting can hold are refused naming the key; a sane number outside our range is listed instead.

mod map;
mod optimizer;
mod prompts;
mod tables;
mod value;

use super::config::ConfigError;
use crate::fsutil::admit;
use serde_json::Value;
use std::path::Path;

/// Which tool wrote the file; the two spell a few settings differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The kohya_ss GUI's saved configuration (JSON).
    GuiJson,
    /// An sd-scripts `--config_file` (TOML).
    ScriptsToml,
}

impl Format {
    pub fn describe(self) -> &'static str {
        match self {
            Format::GuiJson => "kohya_ss GUI config",
            Format::ScriptsToml => "sd-scripts config",
        }
    }
}

/// A kohya setting that was not applied, with its value as the file has it and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub key: String,
    pub value: String,
    pub why: String,
}

impl Skipped {
    /// `key = value: why`, as the CLI prints it and the GUI lists it.
    pub fn line(&self) -> String {
        format!("{} = {}: {}", self.key, self.value, self.why)
    }
}

/// The outcome of an import.
#[derive(Clone, Debug, PartialEq)]
pub struct Imported {
    pub format: Format,
    /// Our keys (`[network] rank = 32` …): a layer for `TrainConfig::build`.
    pub layer: toml::Table,
    /// What was not applied, by key.
    pub skipped: Vec<Skipped>,
}

impl Imported {
    /// The layer as TOML text, what `TrainConfig::build` takes.
    pub fn layer_text(&self) -> String {
        toml::to_string(&self.layer).expect("a TOML table serializes")
    }
}

/// Reads and maps the kohya config at `path` (JSON or TOML, told apart by extension and content).
pub fn read(path: &Path) -> Result<Imported, ConfigError> {
    let text = admit::read_text(path, admit::KOHYA_CONFIG)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    parse(&text, path)
}

/// Maps the text of a kohya config; `path` names it in messages and its extension decides JSON or TOML when it
/// has one. A `sample_prompts` file the config names is read from disk.
pub fn parse(text: &str, path: &Path) -> Result<Imported, ConfigError> {
    let name = path.display().to_string();
    let (format, settings) = settings(text, path, &name)?;
    map::map(&name, format, settings)
}

/// The file's settings, flattened as sd-scripts flattens them: a TOML table's keys count as top-level keys.
fn settings(
    text: &str,
    path: &Path,
    name: &str,
) -> Result<(Format, Vec<(String, Value)>), ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let ext = (path.extension().and_then(|e| e.to_str())).map(str::to_ascii_lowercase);
    let first = text.trim_start().chars().next();
    let is_json =
        ext.as_deref() == Some("json") || (ext.as_deref() != Some("toml") && first == Some('{'));
    if is_json {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            ConfigError(format!(
                "{name} is not valid JSON ({e}); a kohya_ss config is the .json file its GUI saves"
            ))
        })?;
        return match value {
            Value::Object(map) => Ok((Format::GuiJson, map.into_iter().collect())),
            other => Err(not_an_object(name, &other)),
        };
    }
    let table: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            // `[1, 2]` is not TOML but is JSON: say what it is rather than where TOML stumbled.
            if let Ok(json) = serde_json::from_str::<Value>(text) {
                return match json {
                    Value::Object(map) => Ok((Format::GuiJson, map.into_iter().collect())),
                    other => Err(not_an_object(name, &other)),
                };
            }
            return Err(ConfigError(format!(
                "{name} is neither a kohya_ss GUI config (JSON) nor an sd-scripts config (TOML): {}",
                e.to_string().trim_end()
            )));
        }
    };
    if table.get("datasets").is_some_and(toml::Value::is_array) {
        return Err(ConfigError(format!(
            "{name} is an sd-scripts dataset config (--dataset_config): import the training config \
             (--config_file, or the kohya_ss GUI's .json) instead; lora-studio reads the dataset folder itself"
        )));
    }
    if table.contains_key("schema") && table.get("model").is_some_and(toml::Value::is_table) {
        return Err(ConfigError(format!(
            "{name} is a lora-studio config, not a kohya one: use it with `train --config`"
        )));
    }
    let mut flat = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::Table(section) => {
                flat.extend(section.into_iter().map(|(k, v)| (k, json(v))));
            }
            other => flat.push((key, json(other))),
        }
    }
    Ok((Format::ScriptsToml, flat))
}

fn not_an_object(name: &str, value: &Value) -> ConfigError {
    let what = match value {
        Value::Array(_) => "a JSON array",
        Value::String(_) => "a JSON string",
        Value::Number(_) => "a JSON number",
        Value::Bool(_) => "a JSON boolean",
        Value::Null => "JSON null",
        Value::Object(_) => "a JSON object",
    };
    ConfigError(format!(
        "{name} is {what}, not a kohya_ss config (a JSON object of settings such as \"network_dim\": 32)"
    ))
}

/// A TOML value as JSON, the one shape the mapping reads. JSON has no NaN or infinities: those become the text
/// TOML wrote (`nan`, `inf`), which the number checks refuse by name.
fn json(value: toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map_or_else(|| Value::String(f.to_string()), Value::Number),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(json).collect()),
        toml::Value::Table(t) => Value::Object(t.into_iter().map(|(k, v)| (k, json(v))).collect()),
    }
}

#[cfg(test)]
mod tests;
