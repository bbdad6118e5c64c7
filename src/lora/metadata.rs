//! The metadata a LoRA file carries, as kohya's sd-scripts writes it (notes/lora-format.md §3.3): `ss_*` keys
//! (A1111/Forge classify and display LoRAs by them; `ss_base_model_version` above all) and the SAI ModelSpec
//! `modelspec.*` keys. Every value is a string; JSON where kohya writes JSON.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// The model family a LoRA was trained on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseModel {
    Sd1,
    /// SD 2.x with epsilon prediction (2.x-base, 512 px).
    Sd2,
    /// SD 2.x with v-prediction (2.x, 768 px).
    Sd2V,
}

impl BaseModel {
    /// kohya's `ss_base_model_version`.
    fn version(self) -> &'static str {
        match self {
            BaseModel::Sd1 => "sd_v1",
            BaseModel::Sd2 => "sd_v2",
            BaseModel::Sd2V => "sd_v2_v",
        }
    }

    /// The ModelSpec architecture of the base model.
    fn architecture(self) -> &'static str {
        match self {
            BaseModel::Sd1 => "stable-diffusion-v1",
            BaseModel::Sd2 => "stable-diffusion-v2-512",
            BaseModel::Sd2V => "stable-diffusion-v2-768-v",
        }
    }

    /// ModelSpec's `prediction_type` value.
    fn prediction_type(self) -> &'static str {
        match self {
            BaseModel::Sd1 | BaseModel::Sd2 => "epsilon",
            BaseModel::Sd2V => "v",
        }
    }
}

/// Rank and alpha of the 3×3-conv adapters (LoCon), when the run trains them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvLora {
    pub dim: usize,
    pub alpha: f32,
}

/// One image folder of the dataset, as kohya records it in `ss_dataset_dirs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DatasetDir {
    pub n_repeats: u32,
    pub img_count: usize,
}

/// What the trainer knows about a run, turned into the file's metadata by [`LoraMetadata::to_map`].
#[derive(Clone, Debug, PartialEq)]
pub struct LoraMetadata {
    pub base_model: BaseModel,
    /// Rank and alpha of the linear (and 1×1 conv) adapters.
    pub network_dim: usize,
    pub network_alpha: f32,
    pub conv: Option<ConvLora>,
    /// The file's name without extension; also the ModelSpec title.
    pub output_name: String,
    pub training_started_at: SystemTime,
    /// When this file was written (`ss_training_finished_at`, `modelspec.date`).
    pub saved_at: SystemTime,
    pub steps: u64,
    pub epoch: u64,
    pub learning_rate: f64,
    /// Base training resolution (width, height).
    pub resolution: (u32, u32),
    /// Images per epoch, repeats included.
    pub num_train_images: usize,
    /// By folder name.
    pub dataset_dirs: BTreeMap<String, DatasetDir>,
    /// Caption tag counts by folder name.
    pub tag_frequency: BTreeMap<String, BTreeMap<String, usize>>,
    /// Further keys written as given (`ss_seed`, `ss_optimizer`, `modelspec.trigger_phrase`, …).
    pub extra: BTreeMap<String, String>,
}

impl LoraMetadata {
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        let mut put = |key: &str, value: String| map.insert(key.to_owned(), value);
        put("ss_network_module", "networks.lora".into());
        put("ss_network_dim", self.network_dim.to_string());
        put("ss_network_alpha", format!("{:?}", self.network_alpha));
        put("ss_network_args", self.network_args());
        put("ss_base_model_version", self.base_model.version().into());
        // Python's str(bool), as kohya writes it.
        let v2 = matches!(self.base_model, BaseModel::Sd2 | BaseModel::Sd2V);
        put("ss_v2", if v2 { "True" } else { "False" }.into());
        put(
            "ss_training_started_at",
            unix_seconds(self.training_started_at),
        );
        put("ss_training_finished_at", unix_seconds(self.saved_at));
        put("ss_output_name", self.output_name.clone());
        put("ss_steps", self.steps.to_string());
        put("ss_epoch", self.epoch.to_string());
        put("ss_learning_rate", format!("{:?}", self.learning_rate));
        let (w, h) = self.resolution;
        put("ss_resolution", format!("({w}, {h})"));
        put("ss_num_train_images", self.num_train_images.to_string());
        put(
            "ss_dataset_dirs",
            serde_json::json!(self.dataset_dirs).to_string(),
        );
        put(
            "ss_tag_frequency",
            serde_json::json!(self.tag_frequency).to_string(),
        );
        put("modelspec.sai_model_spec", "1.0.1".into());
        put(
            "modelspec.architecture",
            format!("{}/lora", self.base_model.architecture()),
        );
        // kohya's value for SD 1.x/2.x LoRAs: the module names are diffusers'.
        put("modelspec.implementation", "diffusers".into());
        put(
            "modelspec.implementation_version",
            concat!("lora-studio/", env!("CARGO_PKG_VERSION")).into(),
        );
        put("modelspec.title", self.output_name.clone());
        put("modelspec.resolution", format!("{w}x{h}"));
        put("modelspec.date", iso_8601_utc(self.saved_at));
        put(
            "modelspec.prediction_type",
            self.base_model.prediction_type().into(),
        );
        map.extend(self.extra.clone());
        map
    }

    /// kohya's `--network_args` as JSON; its values are the strings typed on kohya's command line.
    fn network_args(&self) -> String {
        let args = self.conv.map(|c| {
            serde_json::json!({"conv_dim": c.dim.to_string(), "conv_alpha": format!("{:?}", c.alpha)})
        });
        args.unwrap_or_else(|| serde_json::json!({})).to_string()
    }
}

/// Seconds since 1970 with a fraction, like Python's `str(time.time())`.
fn unix_seconds(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    format!("{secs:?}")
}

/// `2026-11-28T09:05:00+00:00`, to the second.
fn iso_8601_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let (hh, mm, ss) = (rest / 3600, rest % 3600 / 60, rest % 60);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}+00:00")
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn metadata() -> LoraMetadata {
        LoraMetadata {
            base_model: BaseModel::Sd2V,
            network_dim: 16,
            network_alpha: 8.0,
            conv: Some(ConvLora { dim: 8, alpha: 1.0 }),
            output_name: "sks_person".into(),
            training_started_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_250),
            saved_at: UNIX_EPOCH + Duration::from_secs(1_709_251_199),
            steps: 1200,
            epoch: 6,
            learning_rate: 1e-4,
            resolution: (768, 768),
            num_train_images: 200,
            dataset_dirs: [(
                "10_sks".to_string(),
                DatasetDir {
                    n_repeats: 10,
                    img_count: 20,
                },
            )]
            .into(),
            tag_frequency: [("10_sks".to_string(), [("sks".to_string(), 20)].into())].into(),
            extra: [("ss_seed".to_string(), "42".to_string())].into(),
        }
    }

    #[test]
    fn keys_are_written_as_kohya_writes_them() {
        let map = metadata().to_map();
        let get = |k: &str| {
            map.get(k)
                .map(String::as_str)
                .unwrap_or_else(|| panic!("no {k}"))
        };
        assert_eq!(get("ss_network_module"), "networks.lora");
        assert_eq!(get("ss_network_dim"), "16");
        assert_eq!(get("ss_network_alpha"), "8.0");
        assert_eq!(
            get("ss_network_args"),
            r#"{"conv_alpha":"1.0","conv_dim":"8"}"#
        );
        assert_eq!(
            (get("ss_base_model_version"), get("ss_v2")),
            ("sd_v2_v", "True")
        );
        assert_eq!(get("ss_training_started_at"), "1700000000.25");
        assert_eq!(get("ss_learning_rate"), "0.0001");
        assert_eq!(get("ss_resolution"), "(768, 768)");
        assert_eq!(
            get("ss_dataset_dirs"),
            r#"{"10_sks":{"img_count":20,"n_repeats":10}}"#
        );
        assert_eq!(get("ss_tag_frequency"), r#"{"10_sks":{"sks":20}}"#);
        assert_eq!(get("ss_seed"), "42");
        assert_eq!(
            get("modelspec.architecture"),
            "stable-diffusion-v2-768-v/lora"
        );
        assert_eq!(get("modelspec.prediction_type"), "v");
        assert_eq!(get("modelspec.resolution"), "768x768");
        assert_eq!(get("modelspec.date"), "2024-02-29T23:59:59+00:00");
    }

    #[test]
    fn no_conv_means_empty_network_args() {
        let m = LoraMetadata {
            conv: None,
            ..metadata()
        };
        assert_eq!(m.to_map()["ss_network_args"], "{}");
    }

    #[test]
    fn dates_convert_across_eras() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
