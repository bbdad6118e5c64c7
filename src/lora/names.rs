//! kohya module names: `lora_unet_` / `lora_te_` + the module path with every `.` turned into `_`. The reverse
//! is ambiguous (`transformer_blocks`, `to_q`, `ff.net.0.proj` hold `_` and `.` alike), so names are resolved
//! against the module paths of the model at hand.

use super::LoraError;
use std::collections::{BTreeSet, HashMap};

/// (model component, kohya prefix) as kohya writes them for SD 1.x/2.x, which have one text encoder.
const KOHYA_PREFIXES: [(&str, &str); 2] = [("unet", "lora_unet"), ("text_encoder", "lora_te")];

/// Prefixes kohya writes for two-text-encoder models (SDXL); accepted when loading.
const KOHYA_LOAD_ALIASES: [(&str, &str); 2] =
    [("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")];

/// The kohya name of a module path: `unet.down_blocks.0.attentions.0.proj_in` →
/// `lora_unet_down_blocks_0_attentions_0_proj_in`.
pub fn kohya_name(module_path: &str) -> Result<String, LoraError> {
    KOHYA_PREFIXES
        .iter()
        .find_map(|(component, prefix)| with_prefix(module_path, component, prefix))
        .ok_or_else(|| {
            LoraError::Invalid(format!(
                "module `{module_path}` has no kohya name: only unet.* and text_encoder.* modules (SD 1.x/2.x) \
                 can be saved in kohya format"
            ))
        })
}

/// `prefix` + the path below `component` with `.` → `_`, if `module_path` belongs to `component`.
fn with_prefix(module_path: &str, component: &str, prefix: &str) -> Option<String> {
    let below = module_path.strip_prefix(component)?.strip_prefix('.')?;
    Some(format!("{prefix}_{}", below.replace('.', "_")))
}

/// Maps the kohya names of a model's modules back to their paths.
pub struct KohyaIndex {
    /// `None` where two paths share a kohya name: such a name cannot be resolved.
    paths: HashMap<String, Option<String>>,
}

impl KohyaIndex {
    pub fn new(module_paths: &BTreeSet<String>) -> Self {
        let mut paths = HashMap::new();
        let prefixes = KOHYA_PREFIXES.iter().chain(&KOHYA_LOAD_ALIASES);
        for path in module_paths {
            for name in prefixes
                .clone()
                .filter_map(|(c, p)| with_prefix(path, c, p))
            {
                paths
                    .entry(name)
                    .and_modify(|known: &mut Option<String>| *known = None)
                    .or_insert_with(|| Some(path.clone()));
            }
        }
        KohyaIndex { paths }
    }

    /// The module path of kohya name `name`, if the model has exactly one such module.
    pub fn resolve(&self, name: &str) -> Option<&str> {
        self.paths.get(name)?.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TE_Q: &str = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj";
    const FF: &str = "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj";

    #[test]
    fn names_follow_kohya() {
        assert_eq!(
            kohya_name(FF).unwrap(),
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj"
        );
        assert_eq!(
            kohya_name(TE_Q).unwrap(),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        );
        let err = kohya_name("text_encoder_2.text_model.encoder.layers.0.mlp.fc1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("text_encoder_2"), "{err}");
    }

    #[test]
    fn names_resolve_against_the_model() {
        let paths: BTreeSet<String> = [FF, TE_Q].map(String::from).into();
        let index = KohyaIndex::new(&paths);
        assert_eq!(index.resolve(&kohya_name(FF).unwrap()), Some(FF));
        assert_eq!(
            index.resolve("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
            Some(TE_Q)
        );
        assert_eq!(
            index.resolve("lora_unet_mid_block_attentions_0_proj_in"),
            None
        );
    }

    #[test]
    fn ambiguous_names_resolve_to_nothing() {
        let paths: BTreeSet<String> = ["unet.a_b.c", "unet.a.b_c"].map(String::from).into();
        assert_eq!(KohyaIndex::new(&paths).resolve("lora_unet_a_b_c"), None);
    }
}
