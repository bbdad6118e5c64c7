//! Presets: partial training configs for a model family and card size. The built-in ones (`presets/*.toml`) are
//! compiled in; the user's own live in the user config folder. A preset file is a `TrainConfig` layer plus a
//! `[preset]` table describing it (title, card size, description).

use super::config::{ConfigError, TrainConfig};
use crate::fsutil::admit;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const BUILTIN: [(&str, &str); 4] = [
    ("sd15-6gb", include_str!("../../presets/sd15-6gb.toml")),
    ("sd15-8gb", include_str!("../../presets/sd15-8gb.toml")),
    ("sd15-12gb", include_str!("../../presets/sd15-12gb.toml")),
    ("cpu-demo", include_str!("../../presets/cpu-demo.toml")),
];

/// The `[preset]` table.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresetInfo {
    pub title: String,
    /// The card size (GiB) the preset is made for; 0 for CPU presets.
    pub card_gib: f64,
    pub description: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    /// The file stem (`sd15-6gb`), what `--preset` takes.
    pub name: String,
    pub info: PresetInfo,
    /// The config layer (the file without its `[preset]` table), as TOML.
    pub layer: String,
    /// Where a user preset lives; `None` for built-ins.
    pub path: Option<PathBuf>,
}

impl Preset {
    /// Parses a preset file's text; the config part must be a valid layer over the defaults.
    pub fn parse(name: &str, text: &str, path: Option<PathBuf>) -> Result<Preset, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError(format!("preset {name}: {e}")))?;
        let info = match table.remove("preset") {
            Some(v) => v
                .try_into::<PresetInfo>()
                .map_err(|e| ConfigError(format!("preset {name}, [preset]: {e}")))?,
            None => PresetInfo {
                title: name.to_owned(),
                ..Default::default()
            },
        };
        let layer = toml::to_string(&table).expect("a TOML table serializes");
        TrainConfig::build(&[(&format!("preset {name}"), &layer)], &[])
            .map_err(|e| ConfigError(format!("preset {name}: {}", e.0)))?;
        Ok(Preset {
            name: name.to_owned(),
            info,
            layer,
            path,
        })
    }

    /// This preset over the defaults.
    pub fn config(&self) -> Result<TrainConfig, ConfigError> {
        TrainConfig::build(&[(&format!("preset {}", self.name), &self.layer)], &[])
    }

    /// This preset chosen while `current` is being edited: the defaults, the preset, then `current`'s project
    /// settings (model, dataset, output, sample prompts). Whatever was chosen before, the result is the same.
    pub fn apply_to(&self, current: &TrainConfig) -> Result<TrainConfig, ConfigError> {
        self.apply_with(current, &[])
    }

    /// `apply_to`, then `layers` over it (an imported kohya config).
    pub fn apply_with(
        &self,
        current: &TrainConfig,
        layers: &[(&str, &str)],
    ) -> Result<TrainConfig, ConfigError> {
        let project = toml::to_string(&project_table(current)).expect("a TOML table serializes");
        let name = format!("preset {}", self.name);
        let mut all = vec![
            (name.as_str(), self.layer.as_str()),
            ("the project's settings", project.as_str()),
        ];
        all.extend_from_slice(layers);
        TrainConfig::build(&all, &[])
    }
}

/// The settings that belong to a project rather than to a card, as (section, key); the whole `model` table
/// belongs to the project too. A preset never carries them and choosing one keeps them.
const PROJECT_KEYS: [(&str, &str); 5] = [
    ("dataset", "folder"),
    ("dataset", "caption_extension"),
    ("saving", "output_dir"),
    ("saving", "output_name"),
    ("sampling", "prompts"),
];

/// `config`'s project settings alone, as a config layer.
fn project_table(config: &TrainConfig) -> toml::Table {
    let full = toml::Table::try_from(config).expect("config serializes");
    let mut project = toml::Table::new();
    if let Some(model) = full.get("model") {
        project.insert("model".into(), model.clone());
    }
    for (section, key) in PROJECT_KEYS {
        if let Some(value) = full.get(section).and_then(|t| t.get(key)) {
            let mut table = (project.get(section))
                .and_then(toml::Value::as_table)
                .cloned()
                .unwrap_or_default();
            table.insert(key.into(), value.clone());
            project.insert(section.into(), toml::Value::Table(table));
        }
    }
    project
}

/// The presets that ship with the app.
pub fn builtin() -> Vec<Preset> {
    BUILTIN
        .iter()
        .map(|(name, text)| Preset::parse(name, text, None).expect("built-in presets are valid"))
        .collect()
}

/// The user's preset folder (`~/.config/lora-studio/presets` on Linux).
pub fn user_dir() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "lora-studio").map(|d| d.config_dir().join("presets"))
}

/// The presets in `dir` (`*.toml`), with the ones that fail to parse reported by name.
pub fn load_dir(dir: &Path) -> (Vec<Preset>, Vec<String>) {
    let (mut presets, mut problems) = (Vec::new(), Vec::new());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (presets, problems);
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        let name = path.file_stem().unwrap_or_default().to_string_lossy();
        let parsed = admit::read_text(&path, admit::TOML)
            .map_err(|e| ConfigError(format!("preset {name}: {e}")))
            .and_then(|text| Preset::parse(&name, &text, Some(path.clone())));
        match parsed {
            Ok(p) => presets.push(p),
            Err(e) => problems.push(e.0),
        }
    }
    (presets, problems)
}

/// Built-ins followed by the user's presets.
pub fn all() -> (Vec<Preset>, Vec<String>) {
    let mut presets = builtin();
    let (user, problems) = user_dir().map(|d| load_dir(&d)).unwrap_or_default();
    presets.extend(user);
    (presets, problems)
}

/// A preset by name (built-in or user), or a preset file by path.
pub fn find(name_or_path: &str) -> Result<Preset, ConfigError> {
    let path = Path::new(name_or_path);
    if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
        let text = admit::read_text(path, admit::TOML)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        let name = path.file_stem().unwrap_or_default().to_string_lossy();
        return Preset::parse(&name, &text, Some(path.to_owned()));
    }
    let (presets, _) = all();
    let names: Vec<&str> = presets.iter().map(|p| p.name.as_str()).collect();
    presets
        .iter()
        .find(|p| p.name == name_or_path)
        .cloned()
        .ok_or_else(|| {
            ConfigError(format!(
                "there is no preset `{name_or_path}`; the presets are: {}",
                names.join(", ")
            ))
        })
}

/// Saves the settings of `config` that a preset carries (everything but the model, dataset folder, output and
/// sample prompts, which belong to a project) as a user preset `name` in `dir`, atomically.
pub fn save_user(
    dir: &Path,
    name: &str,
    info: &PresetInfo,
    config: &TrainConfig,
) -> Result<PathBuf, ConfigError> {
    if name.trim().is_empty() || name.contains(['/', '\\', '.']) {
        return Err(ConfigError(
            "a preset name must be a plain file name without dots or folders".into(),
        ));
    }
    let mut table = toml::Table::try_from(config).expect("config serializes");
    table.remove("model");
    table.remove("schema");
    for (section, key) in PROJECT_KEYS {
        if let Some(toml::Value::Table(t)) = table.get_mut(section) {
            t.remove(key);
        }
    }
    table.insert(
        "preset".into(),
        toml::Value::try_from(info).expect("info serializes"),
    );
    let text = toml::to_string_pretty(&table).expect("a TOML table serializes");
    std::fs::create_dir_all(dir)
        .map_err(|e| ConfigError(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join(format!("{name}.toml"));
    crate::fsutil::write_atomic(&path, text.as_bytes())
        .map_err(|e| ConfigError(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse_and_differ_by_card() {
        let presets = builtin();
        assert_eq!(presets.len(), 4);
        let six = presets.iter().find(|p| p.name == "sd15-6gb").unwrap();
        let twelve = presets.iter().find(|p| p.name == "sd15-12gb").unwrap();
        assert_eq!(six.info.card_gib, 6.0);
        let (a, b) = (six.config().unwrap(), twelve.config().unwrap());
        assert_ne!(a.network.targets, b.network.targets);
        assert!(a.training.batch_size < b.training.batch_size);
        assert!(find("sd15-8gb").is_ok());
        let e = find("sd15-4gb").unwrap_err();
        assert!(e.0.contains("sd15-6gb"), "{e}");
    }

    #[test]
    fn user_presets_round_trip_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = builtin()[0].config().unwrap();
        config.network.rank = 12;
        config.dataset.folder = "/my/data".into();
        let info = PresetInfo {
            title: "Mine".into(),
            card_gib: 8.0,
            description: String::new(),
        };
        save_user(dir.path(), "mine", &info, &config).unwrap();
        std::fs::write(dir.path().join("broken.toml"), "[network]\nrnak = 3\n").unwrap();
        let (presets, problems) = load_dir(dir.path());
        assert_eq!(presets.len(), 1);
        assert_eq!(presets[0].info, info);
        let back = presets[0].config().unwrap();
        assert_eq!(back.network.rank, 12);
        assert_eq!(
            back.dataset.folder,
            PathBuf::new(),
            "a preset carries no project paths"
        );
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("broken") && problems[0].contains("rnak"));
        assert!(save_user(dir.path(), "../x", &info, &config).is_err());
    }

    #[test]
    fn choosing_a_preset_gives_the_same_config_whatever_came_before() {
        let presets = builtin();
        let mut project = TrainConfig::default();
        project.model.checkpoint = "/models/base.safetensors".into();
        project.dataset.folder = "/data/dog".into();
        project.saving.output_name = "dog".into();
        project.network.rank = 77;
        for first in &presets {
            let demo = presets.iter().find(|p| p.name == "cpu-demo").unwrap();
            let direct = demo.apply_to(&project).unwrap();
            let via = demo.apply_to(&first.apply_to(&project).unwrap()).unwrap();
            assert_eq!(
                direct.to_toml(),
                via.to_toml(),
                "cpu-demo after {}",
                first.name
            );
            assert_eq!(direct.network.rank, demo.config().unwrap().network.rank);
            assert_eq!(direct.dataset.folder, project.dataset.folder);
            assert_eq!(direct.model.checkpoint, project.model.checkpoint);
            assert_eq!(direct.saving.output_name, "dog");
        }
    }
}
