//! `lora-studio bench train`: step time, peak device memory and achieved FLOP/s of LoRA training on a
//! full-size architecture with random weights — the figures compared with the PyTorch reference
//! (`torch_ref_bench.py`, same config, resolution, batch, rank, targets and recompute).

use crate::model::adapters::{Slot, Trainable};
use crate::model::layers::take_forward_flops;
use crate::model::unet::{UNet, UNetConfig, UNetOptions};
use crate::model::weights::RandomWeights;
use crate::sample::{NoiseSchedule, Prediction};
use crate::train::optim::{Group, Optimizer, OptimizerKind, OptimizerParams};
use crate::train::step::{LossInputs, LossOptions, diffusion_loss, loss_from};
use candle_core::{DType, Tensor};
use clap::{Args, ValueEnum};
use rand::{Rng, SeedableRng};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BenchFamily {
    /// Stable Diffusion 1.5 (860 M-parameter UNet).
    Sd15,
    /// A tiny SD-shaped UNet, for checking the command on a CPU.
    Tiny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BenchPrecision {
    /// bf16 on a GPU, fp32 on the CPU (whose matmuls have no bf16).
    Auto,
    Bf16,
    Fp16,
    Fp32,
}

#[derive(Args, Debug)]
pub struct TrainBench {
    #[arg(long, value_enum, default_value = "sd15")]
    family: BenchFamily,
    #[arg(long, default_value_t = 512)]
    resolution: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, value_enum, default_value = "on")]
    recompute: OnOff,
    #[arg(long, value_enum, default_value = "auto")]
    precision: BenchPrecision,
    /// Timed steps (after the warm-up steps).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Replay each step as a CUDA graph, as training does on a GPU (`off`: launch every kernel from the host).
    #[arg(long, value_enum, default_value = "on")]
    graph: OnOff,
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Result_ {
    device: String,
    family: String,
    resolution: usize,
    batch: usize,
    rank: usize,
    recompute: bool,
    /// Whether steps were replayed as CUDA graphs.
    graph: bool,
    precision: String,
    adapters: usize,
    median_step_ms: f64,
    min_step_ms: f64,
    it_per_s: f64,
    /// Over the timed steps (steady state, as the reference's `max_memory_allocated` after its warm-up).
    peak_mib: Option<f64>,
    /// Over loading and the warm-up steps (the first of which allocates the optimizer state).
    peak_warmup_mib: Option<f64>,
    free_before_mib: Option<f64>,
    free_after_mib: Option<f64>,
    total_mib: Option<f64>,
    tflop_per_step: f64,
    tflop_per_s: f64,
    loss_finite: bool,
    /// Phases of one extra step, synchronised between them.
    forward_ms: f64,
    backward_ms: f64,
    optimizer_ms: f64,
    /// Peak device memory within the extra step's forward, and up to the end of its backward.
    peak_forward_mib: Option<f64>,
    peak_backward_mib: Option<f64>,
}

/// Wall time between device synchronisations.
struct Lap<'a> {
    device: &'a candle_core::Device,
    at: Instant,
}

impl<'a> Lap<'a> {
    fn new(device: &'a candle_core::Device) -> candle_core::Result<Self> {
        device.synchronize()?;
        Ok(Lap {
            device,
            at: Instant::now(),
        })
    }

    /// Milliseconds since the last lap, after the device finished its work.
    fn next(&mut self) -> candle_core::Result<f64> {
        self.device.synchronize()?;
        let ms = self.at.elapsed().as_secs_f64() * 1e3;
        self.at = Instant::now();
        Ok(ms)
    }
}

fn tiny() -> UNetConfig {
    UNetConfig {
        block_out_channels: vec![32, 64],
        down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
        up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
        attention_head_dim: crate::model::unet::PerBlock::One(2),
        cross_attention_dim: 32,
        norm_num_groups: 8,
        layers_per_block: 1,
        ..UNetConfig::sd15()
    }
}

const MIB: f64 = 1024.0 * 1024.0;

pub fn run(args: &TrainBench) -> Result<ExitCode, String> {
    let r = bench(args).map_err(|e| format!("bench train failed: {e}"))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
        );
    } else {
        print_table(&r);
    }
    Ok(ExitCode::SUCCESS)
}

fn bench(args: &TrainBench) -> candle_core::Result<Result_> {
    let (device, warning) = crate::device::best();
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    let dtype = match args.precision {
        BenchPrecision::Auto if device.is_cpu() => DType::F32,
        BenchPrecision::Auto | BenchPrecision::Bf16 => DType::BF16,
        BenchPrecision::Fp16 => DType::F16,
        BenchPrecision::Fp32 => DType::F32,
    };
    let config = match args.family {
        BenchFamily::Sd15 => UNetConfig::sd15(),
        BenchFamily::Tiny => tiny(),
    };
    crate::device::reset_peak(&device);
    let free_before = crate::device::memory(&device);
    let options = UNetOptions {
        recompute: args.recompute == OnOff::On,
        attention_chunk: None,
    };
    let mut unet = UNet::load(&RandomWeights, &config, options, dtype, &device)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    // The reference's targets: the attention projections only (PEFT's to_q, to_k, to_v, to_out.0).
    let attention = |l: &crate::model::layers::Adaptable| {
        let attn = [".to_q", ".to_k", ".to_v", ".to_out.0"]
            .iter()
            .any(|s| l.path.ends_with(s));
        attn.then_some(Slot::Linear)
    };
    let lora = (args.rank, args.rank as f64);
    let trained = Trainable::attach(unet.layers_mut()?, attention, lora, lora, 0.0, &mut rng)?;
    let (vars, adapters) = (trained.vars(), trained.adapters.len());
    let mut opt = Optimizer::new(
        OptimizerKind::AdamW,
        OptimizerParams::default(),
        vec![Group { vars, lr: 1e-4 }],
    );
    let (b, side) = (args.batch, args.resolution / 8);
    let latents = Tensor::randn(0f32, 1.0, (b, 4, side, side), &device)?;
    let context =
        Tensor::randn(0f32, 1.0, (b, 77, config.cross_attention_dim), &device)?.to_dtype(dtype)?;
    let schedule = NoiseSchedule::stable_diffusion();
    let loss_opts = LossOptions {
        prediction: Prediction::Epsilon,
        min_snr_gamma: 0.0,
        prior_loss_weight: 1.0,
    };

    // Forward FLOPs, counted on one plain forward; a training step is counted as the reference counts it:
    // forward + backward (2× forward), plus one more forward when blocks are recomputed.
    take_forward_flops();
    let t = Tensor::from_vec(vec![500f32; b], b, &device)?;
    drop(unet.forward(&latents, &t, &context)?);
    let fwd = take_forward_flops() as f64;
    let flop_step = fwd * if options.recompute { 4.0 } else { 3.0 };

    let mut times = Vec::new();
    let mut loss_finite = true;
    let mut peak_warmup = None;
    #[cfg(feature = "cuda")]
    let mut graph = None;
    #[cfg(feature = "cuda")]
    let use_graph = args.graph == OnOff::On && opt.on_device();
    #[cfg(not(feature = "cuda"))]
    let use_graph = false;
    for i in 0..args.warmup + args.steps {
        let timesteps: Vec<usize> = (0..b).map(|_| rng.random_range(0..1000)).collect();
        let noise = Tensor::randn(0f32, 1.0, latents.shape(), &device)?;
        let inputs = LossInputs::new(&schedule, loss_opts, &timesteps, &[], &device)?;
        device.synchronize()?;
        if i == args.warmup {
            // Steady state from here, as the reference measures it.
            peak_warmup = crate::device::peak(&device);
            crate::device::reset_peak(&device);
        }
        let start = Instant::now();
        let loss = if use_graph {
            #[cfg(feature = "cuda")]
            {
                use crate::train::graph::{Batch, CapturedStep, StepSettings};
                let batch = Batch {
                    latents: &latents,
                    context: &context,
                    noise: &noise,
                    inputs,
                };
                let step = match &mut graph {
                    Some(step) => step,
                    None => graph.insert(CapturedStep::new(batch, loss_opts)?),
                };
                let batch = Batch {
                    latents: &latents,
                    context: &context,
                    noise: &noise,
                    inputs: LossInputs::new(&schedule, loss_opts, &timesteps, &[], &device)?,
                };
                let settings = StepSettings {
                    lr_factor: 1.0,
                    max_norm: 1.0,
                    loss_scale: 1.0,
                };
                step.run(&unet, &mut opt, batch, settings)?.0
            }
            #[cfg(not(feature = "cuda"))]
            unreachable!("graphs are a CUDA feature")
        } else {
            let loss = loss_from(&unet, loss_opts, &latents, &context, &noise, &inputs)?;
            let grads = unet.backward(&loss)?;
            let value = f64::from(loss.to_scalar::<f32>()?);
            drop(loss);
            opt.step(&grads, 1.0, 1.0, 1.0)?;
            value
        };
        loss_finite &= loss.is_finite();
        device.synchronize()?;
        if i >= args.warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    // One more step, synchronised between phases, to show where the time goes.
    let timesteps: Vec<usize> = (0..b).map(|_| rng.random_range(0..1000)).collect();
    let noise = Tensor::randn(0f32, 1.0, latents.shape(), &device)?;
    let peak_all = crate::device::peak(&device);
    let mut lap = Lap::new(&device)?;
    crate::device::reset_peak(&device);
    let loss = diffusion_loss(
        &unet, &schedule, loss_opts, &latents, &context, &timesteps, &noise,
    )?;
    crate::device::trace("phased step: forward done", &device);
    let forward_ms = lap.next()?;
    let peak_forward = crate::device::peak(&device);
    let grads = unet.backward(&loss)?;
    drop(loss);
    let backward_ms = lap.next()?;
    let peak_backward = crate::device::peak(&device);
    opt.step(&grads, 1.0, 1.0, 1.0)?;
    drop(grads);
    let optimizer_ms = lap.next()?;
    let free_after = crate::device::memory(&device);
    Ok(Result_ {
        device: crate::device::describe(&device),
        family: format!("{:?}", args.family).to_lowercase(),
        resolution: args.resolution,
        batch: b,
        rank: args.rank,
        recompute: options.recompute,
        graph: use_graph,
        precision: format!("{dtype:?}").to_lowercase(),
        adapters,
        median_step_ms: median,
        min_step_ms: times[0],
        it_per_s: 1e3 / median,
        peak_mib: peak_all.map(|p| p as f64 / MIB),
        peak_warmup_mib: peak_warmup.map(|p| p as f64 / MIB),
        peak_forward_mib: peak_forward.map(|p| p as f64 / MIB),
        peak_backward_mib: peak_backward.map(|p| p as f64 / MIB),
        free_before_mib: free_before.map(|m| m.0 as f64 / MIB),
        free_after_mib: free_after.map(|m| m.0 as f64 / MIB),
        total_mib: free_before.map(|m| m.1 as f64 / MIB),
        tflop_per_step: flop_step / 1e12,
        tflop_per_s: flop_step / 1e12 / (median / 1e3),
        loss_finite,
        forward_ms,
        backward_ms,
        optimizer_ms,
    })
}

fn print_table(r: &Result_) {
    let mib = |v: Option<f64>| v.map_or("n/a (CPU)".to_owned(), |m| format!("{m:.0} MiB"));
    println!(
        "bench train: {} {} px, batch {}, rank {} attention LoRA ({} adapters), recompute {}, {}, {}",
        r.family,
        r.resolution,
        r.batch,
        r.rank,
        r.adapters,
        if r.recompute { "on" } else { "off" },
        r.precision,
        if r.graph {
            "steps replayed as CUDA graphs"
        } else {
            "kernels launched from the host"
        }
    );
    println!("device: {}", r.device);
    println!("| measure | value |\n|---|---:|");
    println!("| median step | {:.1} ms |", r.median_step_ms);
    println!("| fastest step | {:.1} ms |", r.min_step_ms);
    println!("| it/s | {:.2} |", r.it_per_s);
    println!(
        "| peak device memory over the timed steps (pools' high-water mark) | {} |",
        mib(r.peak_mib)
    );
    println!(
        "| peak over loading and warm-up | {} |",
        mib(r.peak_warmup_mib)
    );
    println!(
        "| free before / after | {} / {} of {} |",
        mib(r.free_before_mib),
        mib(r.free_after_mib),
        mib(r.total_mib)
    );
    println!(
        "| FLOP per step (fwd + 2×bwd{}) | {:.3} T |",
        if r.recompute { " + recompute" } else { "" },
        r.tflop_per_step
    );
    println!("| achieved | {:.2} TFLOP/s |", r.tflop_per_s);
    println!(
        "| one host-launched step by phase: forward / backward / optimizer | {:.1} / {:.1} / {:.1} ms |",
        r.forward_ms, r.backward_ms, r.optimizer_ms
    );
    println!(
        "| that step's peak memory: forward / backward | {} / {} |",
        mib(r.peak_forward_mib),
        mib(r.peak_backward_mib)
    );
}
