//! The training settings form: the common settings of each group first, the rest under "Advanced". Every
//! field says what it does and its usual range on hover. The form edits a `TrainConfig` in place and reports
//! whether anything changed (the caller validates and recomputes the plan).

use super::widgets::{
    FormErrors, FormNumber, form_check, form_combo, form_number, number_field, with_bound,
};
use crate::schema::{self, Field};
use crate::train::config::{Precision, Prediction, SamplePrompt, SaveDtype, Targets, TrainConfig};
use crate::train::lr::LrSchedule;
use crate::train::optim::OptimizerKind;
use egui::{Grid, Ui};

const TARGETS: [(Targets, &str); 3] = [
    (Targets::Attention, "Attention"),
    (Targets::AttentionAndFeedForward, "Attention + feed-forward"),
    (Targets::All, "All (with LoCon convs)"),
];
const OPTIMIZERS: [(OptimizerKind, &str); 5] = [
    (OptimizerKind::AdamW, "AdamW"),
    (OptimizerKind::AdamW8bit, "AdamW 8-bit"),
    (OptimizerKind::Adafactor, "Adafactor"),
    (OptimizerKind::Prodigy, "Prodigy"),
    (OptimizerKind::Lion, "Lion"),
];
const SCHEDULES: [(LrSchedule, &str); 4] = [
    (LrSchedule::Constant, "Constant"),
    (LrSchedule::Linear, "Linear"),
    (LrSchedule::Cosine, "Cosine"),
    (LrSchedule::CosineWithRestarts, "Cosine with restarts"),
];
const PRECISIONS: [(Precision, &str); 4] = [
    (Precision::Auto, "Auto"),
    (Precision::Bf16, "bf16"),
    (Precision::Fp16, "fp16"),
    (Precision::Fp32, "fp32"),
];
const SAVE_DTYPES: [(SaveDtype, &str); 3] = [
    (SaveDtype::Fp16, "fp16"),
    (SaveDtype::Bf16, "bf16"),
    (SaveDtype::Fp32, "fp32"),
];
const PREDICTIONS: [(Prediction, &str); 3] = [
    (Prediction::Auto, "From the checkpoint"),
    (Prediction::Epsilon, "Epsilon"),
    (Prediction::V, "v"),
];

fn group(ui: &mut Ui, id: &str, body: impl FnOnce(&mut Ui) -> bool) -> bool {
    Grid::new(id)
        .num_columns(2)
        .spacing([12.0, 4.0])
        .show(ui, body)
        .inner
}

/// The common settings, grouped. Returns true when one changed.
pub fn common(ui: &mut Ui, c: &mut TrainConfig, errors: &mut FormErrors) -> bool {
    let mut changed = false;
    ui.strong("Network");
    changed |= group(ui, "form-network", |ui| {
        let mut ch = form_number(
            ui,
            &schema::RANK,
            "Size of each adapter: more rank learns more detail and makes a bigger file. Usually 4-64 (16 is \
             a good start).",
            &mut c.network.rank,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::ALPHA,
            "Scales the adapter's effect by alpha / rank. Usually equal to the rank or half of it.",
            &mut c.network.alpha,
            errors,
        );
        ch |= form_combo(
            ui,
            schema::TARGETS.label,
            "Which layers get adapters. Attention + feed-forward is kohya's default; All adds LoCon on the \
             convolutions (more capacity, more memory).",
            &mut c.network.targets,
            &TARGETS,
        );
        ch
    });
    ui.add_space(4.0);
    ui.strong("Optimizer");
    changed |= group(ui, "form-optimizer", |ui| {
        let mut ch = form_combo(
            ui,
            schema::OPTIMIZER.label,
            "AdamW is the usual choice; AdamW 8-bit and Adafactor keep less state (less memory); Prodigy sets its \
             own step size (learning rate 1); Lion wants a learning rate 3-10x below AdamW's.",
            &mut c.optimizer.kind,
            &OPTIMIZERS,
        );
        ch |= form_number(
            ui,
            &schema::LR,
            "How big each update is. Usually 1e-4 for SD 1.5 LoRA (5e-5 to 5e-4); too high gives burnt, noisy \
             images.",
            &mut c.optimizer.lr,
            errors,
        );
        ch |= form_combo(
            ui,
            schema::SCHEDULE.label,
            "How the learning rate changes over the run: constant, or falling linearly or along a cosine.",
            &mut c.optimizer.schedule,
            &SCHEDULES,
        );
        ch |= form_number(
            ui,
            &schema::WARMUP_STEPS,
            "Steps over which the learning rate rises from 0. Usually 0-10% of the steps.",
            &mut c.optimizer.warmup_steps,
            errors,
        );
        ch
    });
    ui.add_space(4.0);
    ui.strong("Schedule");
    changed |= group(ui, "form-schedule", |ui| {
        let mut ch = form_number(
            ui,
            &schema::STEPS,
            "Total optimizer steps. 0 lets Epochs decide. Usually 1000-3000 for a character or style.",
            &mut c.training.steps,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::EPOCHS,
            "Passes over the dataset (repeats included); used when Steps is 0.",
            &mut c.training.epochs,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::BATCH_SIZE,
            "Images per step. More is smoother but needs more memory. Usually 1-4.",
            &mut c.training.batch_size,
            errors,
        );
        ch
    });
    ui.add_space(4.0);
    ui.strong("Dataset options");
    changed |= group(ui, "form-dataset", |ui| {
        let mut ch = form_number(
            ui,
            &schema::RESOLUTION,
            "Base training resolution in pixels (a multiple of 8): 512 for SD 1.5, 768 for SD 2.x-v.",
            &mut c.dataset.resolution,
            errors,
        );
        ch |= form_check(
            ui,
            schema::BUCKETING.label,
            "Train each image near its own aspect ratio instead of cropping it to a square.",
            &mut c.dataset.bucketing,
        );
        ch |= form_check(
            ui,
            schema::FLIP.label,
            "Also train on left-right mirrored images. Off for subjects that are not symmetric (text, logos).",
            &mut c.dataset.flip,
        );
        ch
    });
    ui.add_space(4.0);
    ui.strong("Saving");
    changed |= group(ui, "form-saving", |ui| {
        let mut ch = form_number(
            ui,
            &schema::SAVE_EVERY_N_STEPS,
            "Write an intermediate LoRA every N steps (0 = only at the end). Usually every 10-25% of the run.",
            &mut c.saving.every_n_steps,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::KEEP_LAST,
            "Keep only the newest K intermediate saves (0 = keep all).",
            &mut c.saving.keep_last,
            errors,
        );
        ch
    });
    changed
}

/// The settings most runs leave alone.
pub fn advanced(ui: &mut Ui, c: &mut TrainConfig, errors: &mut FormErrors) -> bool {
    group(ui, "form-advanced", |ui| {
        let mut ch = form_combo(
            ui,
            schema::PREDICTION.label,
            "What the model predicts. Leave it to the checkpoint unless detection is wrong.",
            &mut c.model.prediction,
            &PREDICTIONS,
        );
        ch |= form_number(
            ui,
            &schema::CLIP_SKIP,
            "1 = the text encoder's last layer; 2 = the penultimate (common for anime models).",
            &mut c.model.clip_skip,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::CONV_RANK,
            "Rank of the LoCon convolution adapters (Layers = All). Usually 4-16.",
            &mut c.network.conv_rank,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::CONV_ALPHA,
            "Alpha of the LoCon convolution adapters. Usually half the conv rank.",
            &mut c.network.conv_alpha,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::NETWORK_DROPOUT,
            "Dropout inside each adapter while training (kohya's network_dropout), against overfitting. Usually 0-0.1.",
            &mut c.network.dropout,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::LR_TEXT_ENCODER,
            "Learning rate of the text-encoder adapters (when trained). Usually half the UNet's.",
            &mut c.optimizer.lr_text_encoder,
            errors,
        );
        ch |= form_check(
            ui,
            schema::TRAIN_TEXT_ENCODER.label,
            "Also put adapters on the text encoder: learns new words better, costs memory.",
            &mut c.training.train_text_encoder,
        );
        ch |= form_number(
            ui,
            &schema::RESTARTS,
            "Cycles of the cosine-with-restarts schedule. Usually 1-4.",
            &mut c.optimizer.restarts,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::MAX_GRAD_NORM,
            "Clip the gradient norm to this (0 = off). Usually 1.",
            &mut c.optimizer.max_grad_norm,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::GRADIENT_ACCUMULATION,
            "Sum gradients over this many batches per update: a bigger effective batch without more memory.",
            &mut c.optimizer.gradient_accumulation,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::BETA1,
            "AdamW's first-moment decay. Usually 0.9.",
            &mut c.optimizer.params.beta1,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::BETA2,
            "AdamW's second-moment decay. Usually 0.999.",
            &mut c.optimizer.params.beta2,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::EPS,
            "AdamW's epsilon. Usually 1e-8.",
            &mut c.optimizer.params.eps,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::WEIGHT_DECAY,
            "Pulls the weights toward zero. Usually 0-0.1.",
            &mut c.optimizer.params.weight_decay,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::SEED,
            "Seeds the noise, timesteps and data order: the same seed repeats a run exactly.",
            &mut c.training.seed,
            errors,
        );
        ch |= form_combo(
            ui,
            schema::PRECISION.label,
            "Compute precision on the GPU. Auto: bf16 where supported, else fp16. The CPU always uses fp32.",
            &mut c.training.precision,
            &PRECISIONS,
        );
        ch |= form_check(
            ui,
            schema::RECOMPUTE.label,
            "Recompute blocks in the backward pass: much less memory, steps about a third slower. On for \
             6-8 GB cards.",
            &mut c.training.recompute,
        );
        ch |= form_number(
            ui,
            &schema::NOISE_OFFSET,
            "Helps the model learn very dark or bright images. Usually 0-0.1.",
            &mut c.training.noise_offset,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::MIN_SNR_GAMMA,
            "Min-SNR loss weighting (0 = off). 5 is the usual value; it steadies training.",
            &mut c.training.min_snr_gamma,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::MIN_BUCKET_SIDE,
            "Smallest bucket side in pixels. Usually 256.",
            &mut c.dataset.min_bucket_side,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::MAX_BUCKET_SIDE,
            "Largest bucket side in pixels. Lower it to save memory (e.g. to the resolution).",
            &mut c.dataset.max_bucket_side,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::BUCKET_STEP,
            "Bucket sides are multiples of this. Usually 64.",
            &mut c.dataset.bucket_step,
            errors,
        );
        ch |= form_check(
            ui,
            schema::SHUFFLE_CAPTION.label,
            "Shuffle the comma-separated tags each time a caption is used (the first Keep tokens stay).",
            &mut c.dataset.shuffle_caption,
        );
        ch |= form_number(
            ui,
            &schema::KEEP_TOKENS,
            "Tags at the front that shuffling and tag dropout leave in place (the trigger word). Usually 1.",
            &mut c.dataset.keep_tokens,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::CAPTION_DROPOUT,
            "Probability of training an image with an empty caption. Usually 0-0.1.",
            &mut c.dataset.caption_dropout,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::TAG_DROPOUT,
            "Probability of dropping each tag. Usually 0-0.1.",
            &mut c.dataset.tag_dropout,
            errors,
        );
        ch |= form_number(
            ui,
            &schema::SAVE_EVERY_N_EPOCHS,
            "Write an intermediate LoRA every N epochs (0 = off).",
            &mut c.saving.every_n_epochs,
            errors,
        );
        ch |= form_combo(
            ui,
            schema::SAVE_DTYPE.label,
            "Tensor precision of the saved LoRA: fp16 (usual), bf16 or fp32.",
            &mut c.saving.dtype,
            &SAVE_DTYPES,
        );
        ch
    })
}

/// The sample prompts and how often they are made.
pub fn sampling(ui: &mut Ui, c: &mut TrainConfig, errors: &mut FormErrors) -> bool {
    let mut changed = false;
    ui.strong("Sample prompts");
    changed |= group(ui, "form-sampling", |ui| {
        form_number(
            ui,
            &schema::SAMPLE_EVERY_N_STEPS,
            "Generate the sample prompts with the adapter every N steps (0 = off). Usually as often as saves.",
            &mut c.sampling.every_n_steps,
            errors,
        )
    });
    let mut remove = None;
    for (i, p) in c.sampling.prompts.iter_mut().enumerate() {
        egui::Frame::group(ui.style()).show(ui, |ui| {
            ui.horizontal(|ui| {
                let l = ui.label(format!("Prompt {}", i + 1));
                changed |= ui
                    .add(egui::TextEdit::singleline(&mut p.prompt).desired_width(300.0))
                    .labelled_by(l.id)
                    .on_hover_text("What the sample shows; use your trigger word.")
                    .changed();
                if ui
                    .small_button("Remove")
                    .on_hover_text("Remove this prompt")
                    .clicked()
                {
                    remove = Some(i);
                }
            });
            ui.horizontal(|ui| {
                let l = ui.label(format!("Negative {}", i + 1));
                changed |= ui
                    .add(egui::TextEdit::singleline(&mut p.negative).desired_width(300.0))
                    .labelled_by(l.id)
                    .on_hover_text("What the sample should not show (may be empty).")
                    .changed();
            });
            ui.horizontal_wrapped(|ui| {
                let row = i + 1;
                changed |= prompt_number(
                    ui,
                    (row, &schema::PROMPT_SEED),
                    "The same seed gives comparable samples across steps.",
                    &mut p.seed,
                    errors,
                );
                changed |= prompt_number(
                    ui,
                    (row, &schema::PROMPT_WIDTH),
                    "Sample width in pixels (a multiple of 8; usually the resolution).",
                    &mut p.width,
                    errors,
                );
                changed |= prompt_number(
                    ui,
                    (row, &schema::PROMPT_HEIGHT),
                    "Sample height in pixels (a multiple of 8).",
                    &mut p.height,
                    errors,
                );
                changed |= prompt_number(
                    ui,
                    (row, &schema::PROMPT_STEPS),
                    "Denoising steps per sample. Usually 20-30.",
                    &mut p.steps,
                    errors,
                );
                changed |= prompt_number(
                    ui,
                    (row, &schema::PROMPT_CFG),
                    "Classifier-free guidance: how strictly the prompt is followed. Usually 5-8.",
                    &mut p.cfg,
                    errors,
                );
            });
        });
    }
    if let Some(i) = remove {
        c.sampling.prompts.remove(i);
        changed = true;
    }
    if ui
        .button("Add prompt")
        .on_hover_text("Add a sample prompt (made at every sample step).")
        .clicked()
    {
        let side = c.dataset.resolution;
        let seed = c.sampling.prompts.last().map_or(1, |p| p.seed + 1);
        c.sampling.prompts.push(SamplePrompt {
            width: side,
            height: side,
            seed,
            ..Default::default()
        });
        changed = true;
    }
    changed
}

/// A number of sample prompt `row`: shown as its field's label beside it, reported as "Prompt 2 width".
fn prompt_number<N: FormNumber>(
    ui: &mut Ui,
    (row, field): (usize, &Field),
    tip: &str,
    value: &mut N,
    errors: &mut FormErrors,
) -> bool {
    let l = ui.label(field.label);
    let label = prompt_label(row, field);
    number_field(ui, &label, value, field.bound(), errors, 64.0)
        .labelled_by(l.id)
        .on_hover_text(with_bound(tip, field))
        .changed()
}

fn prompt_label(row: usize, field: &Field) -> String {
    format!("Prompt {row} {}", field.label.to_lowercase())
}

/// `message` with each `` `key` `` it names replaced by the field's label on screen ("Batch size"), and each
/// sample prompt key by its row ("Prompt 2 width").
pub fn on_screen(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find('`') {
        let Some(len) = rest[open + 1..].find('`') else {
            break;
        };
        let key = &rest[open + 1..open + 1 + len];
        out.push_str(&rest[..open]);
        match label_of(key) {
            Some(label) => out.push_str(&format!("\"{label}\"")),
            None => out.push_str(&rest[open..open + len + 2]),
        }
        rest = &rest[open + len + 2..];
    }
    out.push_str(rest);
    out
}

fn label_of(key: &str) -> Option<String> {
    let field = schema::field(key)?;
    match key.strip_prefix("sampling.prompts[") {
        Some(rest) => {
            let row = rest.split_once(']')?.0.parse::<usize>().ok()? + 1;
            Some(prompt_label(row, field))
        }
        None => Some(field.label.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_messages_name_the_labels_on_screen() {
        assert_eq!(
            on_screen("`training.batch_size` must be at least 1"),
            "\"Batch size\" must be at least 1"
        );
        assert_eq!(
            on_screen("Lower `training.batch_size` to 4, or `sampling.prompts[1].width` …"),
            "Lower \"Batch size\" to 4, or \"Prompt 2 width\" …"
        );
        assert_eq!(on_screen("`unknown.key` stays"), "`unknown.key` stays");
    }
}
