//! What kohya settings lora-studio does not apply: the ones with no effect here, the defaults that need no
//! mention, and why the others are not available.

/// The GUI's options of LyCORIS networks.
pub(super) const LYCORIS_OPTIONS: [&str; 7] = [
    "LyCORIS_preset",
    "bypass_mode",
    "dora_wd",
    "rank_dropout_scale",
    "train_norm",
    "use_scalar",
    "use_tucker",
];

/// Settings with no effect on what lora-studio trains (attention kernels, data loaders, logging, uploads,
/// launchers, caches it always keeps, the GUI's own fields), whatever their value.
pub(super) const NO_EFFECT: &[&str] = &[
    "additional_network_weights",
    "cache_latents",
    "cache_latents_to_disk",
    "cache_text_encoder_outputs",
    "cache_text_encoder_outputs_to_disk",
    "config_file",
    "extra_accelerate_launch_args",
    "file_path",
    "gpu_ids",
    "highvram",
    "logging_dir",
    "lowram",
    "lowvram",
    "main_process_port",
    "max_data_loader_n_workers",
    "max_token_length",
    "mem_eff_attn",
    "model_list",
    "multi_gpu",
    "no_half_vae",
    "num_cpu_threads_per_process",
    "num_machines",
    "num_processes",
    "output_config",
    "persistent_data_loader_workers",
    "sample_sampler",
    "save_as_bool",
    "save_last_n_epochs_state",
    "save_last_n_steps_state",
    "save_state",
    "save_state_on_train_end",
    "sdpa",
    "skip_cache_check",
    "tokenizer_cache_dir",
    "v2",
    "vae_batch_size",
    "xformers",
    // Only read with a loss or noise type that is listed when chosen.
    "huber_c",
    "huber_scale",
    "huber_schedule",
    "multires_noise_discount",
    // FLUX/SD3 keys (their model flag is listed when on).
    "ae",
    "apply_t5_attn_mask",
    "blocks_to_swap",
    "clip_g",
    "clip_l",
    "cpu_offload_checkpointing",
    "discrete_flow_shift",
    "double_blocks_to_swap",
    "enable_all_linear",
    "fp8_base_unet",
    "guidance_scale",
    "in_dims",
    "logit_mean",
    "logit_std",
    "mem_eff_save",
    "mode_scale",
    "model_prediction_type",
    "model_type",
    "pos_emb_random_crop_rate",
    "save_clip",
    "save_t5xxl",
    "single_blocks_to_swap",
    "split_mode",
    "split_qkv",
    "timestep_sampling",
    "train_blocks",
    "train_t5xxl",
    "weighting_scheme",
    // LyCORIS options of types lora-studio does not train (their type is listed).
    "constrain",
    "decompose_both",
    "factor",
    "rescaled",
    "train_on_input",
    "unit",
    "use_cp",
];

pub(super) const NO_EFFECT_PREFIXES: &[&str] = &[
    "anima_",
    "console_log",
    "ddp_",
    "dynamo_",
    "flux1_",
    "huggingface_",
    "hunyuan_",
    "img_",
    "log_",
    "lumina_",
    "sd3_",
    "sdxl_",
    "show_timesteps",
    "single_",
    "t5",
    "train_double_block",
    "train_single_block",
    "txt_",
    "wandb_",
];

/// Settings whose default is not an "off" value, with that default (no mention when they hold it).
pub(super) fn inert(key: &str) -> Option<&'static str> {
    Some(match key {
        "caption_separator" => ",",
        "LyCORIS_preset" | "preset" => "full",
        "loss_type" => "l2",
        "max_timestep" => "1000",
        "noise_offset_type" => "Original",
        "save_model_as" => "safetensors",
        "token_warmup_min" => "1",
        _ => return None,
    })
}

/// Why a kohya feature is not applied.
pub(super) fn unsupported(key: &str) -> Option<&'static str> {
    Some(match key {
        "adaptive_noise_scale" => "adaptive noise scale is not available",
        "additional_parameters" => {
            "extra sd-scripts arguments are not read: set what they do in the config"
        }
        "bypass_mode" | "rank_dropout_scale" | "train_norm" | "use_scalar" | "use_tucker" => {
            "this LyCORIS option is not available"
        }
        "caption_dropout_every_n_epochs" => {
            "dropping every caption every N epochs is not available (`dataset.caption_dropout` is)"
        }
        "caption_prefix"
        | "caption_suffix"
        | "caption_separator"
        | "keep_tokens_separator"
        | "secondary_separator"
        | "enable_wildcard" => "not available: captions are read as written",
        "color_aug" => "colour augmentation is not available",
        "dataset_config" => {
            "sd-scripts dataset configs are not read: lora-studio trains `dataset.folder` (kohya N_name \
             subfolders included)"
        }
        "debiased_estimation_loss" => {
            "debiased estimation is not available (min-SNR-γ is: `training.min_snr_gamma`)"
        }
        "down_lr_weight" | "mid_lr_weight" | "up_lr_weight" | "block_lr_zero_threshold" => {
            "block-wise learning rates are not available"
        }
        "block_dims" | "block_alphas" | "conv_block_dims" | "conv_block_alphas" => {
            "block-wise ranks are not available"
        }
        "dora_wd" => "DoRA is not available",
        "dropout" => {
            "LyCORIS dropout is not available (`network.dropout` is kohya's network_dropout)"
        }
        "face_crop_aug_range" | "random_crop" => {
            "not available: images are resized to their bucket and centre-cropped"
        }
        "fp8_base" => "fp8 base weights are not available for SD 1.x/2.x",
        "full_bf16" | "full_fp16" => {
            "adapter weights and optimizer state stay in f32; the compute precision is `training.precision`"
        }
        "fused_backward_pass" => "the fused backward pass is not available",
        "ggpo_beta" | "ggpo_sigma" | "train_lora_ggpo" => "GGPO is not available",
        "ip_noise_gamma" | "ip_noise_gamma_random_strength" => {
            "input-perturbation noise is not available"
        }
        "loraplus_lr_ratio" | "loraplus_text_encoder_lr_ratio" | "loraplus_unet_lr_ratio" => {
            "LoRA+ is not available"
        }
        "loss_type" => "only the L2 (MSE) loss is available",
        "lr_decay_steps"
        | "lr_scheduler_args"
        | "lr_scheduler_min_lr_ratio"
        | "lr_scheduler_timescale"
        | "lr_scheduler_type" => "custom schedulers are not available",
        "LyCORIS_preset" | "preset" => {
            "LyCORIS presets are not available: the layers are `network.targets`"
        }
        "masked_loss" | "alpha_mask" => "masked loss is not available",
        "max_timestep" | "min_timestep" => "timesteps are drawn from the whole range",
        "metadata_author"
        | "metadata_description"
        | "metadata_license"
        | "metadata_tags"
        | "metadata_title"
        | "training_comment" => "lora-studio writes its own metadata",
        "module_dropout" | "rank_dropout" => {
            "not available (`network.dropout` is kohya's network_dropout)"
        }
        "multires_noise_iterations" => "multi-resolution noise is not available",
        "noise_offset_random_strength" => "the noise offset is fixed (no random strength)",
        "resume" => {
            "kohya training states cannot be read; lora-studio resumes its own runs (train --resume \
             OUTPUT/state)"
        }
        "sample_every_n_epochs" => "samples are made every N steps (`sampling.every_n_steps`)",
        "save_every_n_epochs_ratio" | "save_n_epoch_ratio" => {
            "set `saving.every_n_epochs` or `saving.every_n_steps`"
        }
        "save_model_as" => "LoRA files are written as .safetensors",
        "scale_v_pred_loss_like_noise_pred" | "v_pred_like_loss" => {
            "this v-prediction loss scaling is not available"
        }
        "scale_weight_norms" => "max-norm regularization is not available",
        "stop_text_encoder_training" | "stop_text_encoder_training_pct" => {
            "a trained text encoder is trained for the whole run"
        }
        "token_warmup_min" | "token_warmup_step" => "caption token warmup is not available",
        "train_inpainting" => "inpainting training is not available",
        "weighted_captions" => "weighted captions are not available",
        "zero_terminal_snr" => "zero-terminal-SNR rescaling is not available",
        _ => return None,
    })
}
