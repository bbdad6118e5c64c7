//! `lora-studio bench kernels`: each of our fused CUDA kernels and custom ops against the candle ops it replaces,
//! at SD1.5's shapes — how far its results are from the CPU's f32 result, and the GPU time of both forms.

use std::process::ExitCode;

pub fn run(batch: usize, only: Option<&str>, json: bool) -> Result<ExitCode, String> {
    #[cfg(feature = "cuda")]
    {
        let rows = measure::all(batch, only.unwrap_or(""))
            .map_err(|e| format!("bench kernels failed: {e}"))?;
        let table = measure::table(&rows);
        super::bench::print_result(&rows, json, table)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (batch, only, json);
        Err("bench kernels measures the CUDA kernels: build with `--features cuda` and run it on an NVIDIA GPU".into())
    }
}

#[cfg(feature = "cuda")]
mod measure {
    use crate::model::attention::attention;
    use crate::model::fused;
    use crate::model::layers::{Adaptable, AdapterShape, GroupNorm, LayerNorm, geglu};
    use crate::train::optim::{Group, Optimizer, OptimizerKind, OptimizerParams};
    use candle_core::{DType, Device, Result, Tensor, Var};
    use std::time::Instant;

    #[derive(serde::Serialize)]
    pub struct Row {
        op: String,
        /// The largest |GPU − CPU| over all outputs, relative to the largest |CPU| value of that output.
        max_rel_error: f64,
        ours_ms: f64,
        candle_ms: f64,
    }

    type Run = Box<dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>>;

    /// Inputs (made on the CPU from a seed, then moved), our op and candle's form of it, returning the outputs.
    struct Case {
        op: String,
        inputs: Vec<Vec<usize>>,
        ours: Run,
        candle: Run,
    }

    /// A case whose replaced form is the same code with `switch(false)`: our fused kernels or flash attention off.
    fn switched(
        op: String,
        inputs: Vec<Vec<usize>>,
        f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>> + Clone + 'static,
        switch: fn(bool),
    ) -> Case {
        let g = f.clone();
        Case {
            op,
            inputs,
            ours: Box::new(f),
            candle: Box::new(move |xs| {
                switch(false);
                let out = g(xs);
                switch(true);
                out
            }),
        }
    }

    /// A case whose candle form is the same code with our fused kernels off.
    fn fused(
        op: String,
        inputs: Vec<Vec<usize>>,
        f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>> + Clone + 'static,
    ) -> Case {
        switched(op, inputs, f, fused::set_enabled)
    }

    /// A case comparing flash attention with our chunked attention (fused softmax) it replaced.
    fn flash(
        op: String,
        inputs: Vec<Vec<usize>>,
        f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>> + Clone + 'static,
    ) -> Case {
        let op = format!("{op} (vs our chunked form)");
        switched(op, inputs, f, fused::set_flash)
    }

    /// Self-attention of [b, n, c] with `heads` heads, or cross-attention over 77 tokens: forward and backward.
    fn attention_case(b: usize, n: usize, c: usize, heads: usize, cross: bool) -> Case {
        let kv = if cross { 77 } else { n };
        let kind = if cross { "cross" } else { "self" };
        flash(
            format!(
                "{kind}-attention [{b}, {n}, {c}], {heads} heads of {}",
                c / heads
            ),
            vec![vec![b, n, c], vec![b, kv, c], vec![b, kv, c], vec![b, n, c]],
            move |xs| with_grads(xs, 3, |a| attention(&a[0], &a[1], &a[2], heads, None)),
        )
    }

    /// A 3×3 conv (frozen weight, last input the upstream gradient): forward and input gradient, ours (`Adaptable`)
    /// or candle's (stock autograd, which also computes the weight's gradient).
    fn conv(stride: usize, ours: bool) -> impl Fn(&[Tensor]) -> Result<Vec<Tensor>> {
        move |xs: &[Tensor]| {
            let w = xs[1].clone();
            with_grads(xs, 1, |a: &[Tensor]| {
                if ours {
                    let shape = AdapterShape::Conv {
                        kernel: 3,
                        stride,
                        padding: 1,
                    };
                    Adaptable::new("conv", w.clone(), None, shape).forward(&a[0])
                } else {
                    a[0].conv2d(Var::from_tensor(&w)?.as_tensor(), 1, stride, 1, 1)
                }
            })
        }
    }

    fn inputs(shapes: &[Vec<usize>], dtype: DType, device: &Device) -> Result<Vec<Tensor>> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let normal = rand_distr::StandardNormal;
        shapes
            .iter()
            .map(|s| {
                let n = s.iter().product();
                let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
                // Rounded to bf16 first, so that both devices start from the same values.
                Tensor::from_vec(v, s.as_slice(), &Device::Cpu)?
                    .to_dtype(DType::BF16)?
                    .to_dtype(dtype)?
                    .to_device(device)
            })
            .collect()
    }

    /// Outputs and the input gradients of Σ out ⊙ g (g the last input) with respect to the first `n` inputs.
    fn with_grads(
        xs: &[Tensor],
        n: usize,
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        let vars: Vec<Var> = xs[..n]
            .iter()
            .map(Var::from_tensor)
            .collect::<Result<_>>()?;
        let mut args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        args.extend_from_slice(&xs[n..]);
        let y = f(&args)?;
        let g = xs.last().expect("an upstream gradient");
        let grads = (&y * g)?.sum_all()?.backward()?;
        let mut out = vec![y];
        for v in &vars {
            out.push(grads.get(v).expect("a gradient").clone());
        }
        Ok(out)
    }

    fn cases(b: usize) -> Vec<Case> {
        let norm = |groups| {
            move |xs: &[Tensor]| {
                let c = xs[1].dim(0)?;
                let w = xs[1].to_dtype(DType::F32)?;
                let bias = xs[2].to_dtype(DType::F32)?;
                match groups {
                    Some(g) => GroupNorm::new(w, bias, g, 1e-5).forward(&xs[0]),
                    None => LayerNorm::new(w, bias, 1e-5).forward(&xs[0].reshape(((), c))?),
                }
            }
        };
        let attn = |xs: &[Tensor]| attention(&xs[0], &xs[1], &xs[2], 8, None);
        vec![
            fused(
                format!("GroupNorm [{b}, 320, 64, 64], 32 groups: forward + backward"),
                vec![
                    vec![b, 320, 64, 64],
                    vec![320],
                    vec![320],
                    vec![b, 320, 64, 64],
                ],
                move |xs| with_grads(xs, 1, norm(Some(32))),
            ),
            fused(
                format!("LayerNorm [{}, 320]: forward + backward", b * 4096),
                vec![
                    vec![b * 4096, 320],
                    vec![320],
                    vec![320],
                    vec![b * 4096, 320],
                ],
                move |xs| with_grads(xs, 1, norm(None)),
            ),
            fused(
                format!("self-attention [{b}, 4096, 320], 8 heads: forward + backward"),
                vec![vec![b, 4096, 320]; 4],
                move |xs| with_grads(xs, 3, attn),
            ),
            fused(
                format!("cross-attention [{b}, 4096, 320] over 77 tokens: forward + backward"),
                vec![
                    vec![b, 4096, 320],
                    vec![b, 77, 320],
                    vec![b, 77, 320],
                    vec![b, 4096, 320],
                ],
                move |xs| with_grads(xs, 3, attn),
            ),
            attention_case(b, 4096, 320, 8, false),
            attention_case(b, 4096, 320, 8, true),
            attention_case(b, 1024, 640, 8, false),
            attention_case(b, 256, 1280, 8, false),
            attention_case(b, 1000, 640, 10, false),
            attention_case(b, 1000, 640, 10, true),
            attention_case(b, 512, 1024, 8, false),
            flash(
                format!("self-attention [{b}, 1024, 640], 8 heads of 80, in f16"),
                vec![vec![b, 1024, 640]; 4],
                move |xs| {
                    with_grads(xs, 3, |a| {
                        let f16 = |t: &Tensor| t.to_dtype(DType::F16);
                        attention(&f16(&a[0])?, &f16(&a[1])?, &f16(&a[2])?, 8, None)?
                            .to_dtype(a[0].dtype())
                    })
                },
            ),
            fused(
                format!("GEGLU [{b}, 4096, 2560] → 1280: forward + backward"),
                vec![vec![b, 4096, 2560], vec![b, 4096, 1280]],
                |xs| with_grads(xs, 1, |a| geglu(&a[0])),
            ),
            fused(
                "AdamW, 128 adapter matrices [16, 320] (norm, clip, update)".into(),
                vec![vec![16, 320]; 256],
                adamw,
            ),
            Case {
                op: format!("3×3 conv [{b}, 320, 64, 64], stride 1: forward + input gradient"),
                inputs: vec![
                    vec![b, 320, 64, 64],
                    vec![320, 320, 3, 3],
                    vec![b, 320, 64, 64],
                ],
                ours: Box::new(conv(1, true)),
                candle: Box::new(conv(1, false)),
            },
            Case {
                op: format!("3×3 conv [{b}, 320, 64, 64], stride 2: forward + input gradient"),
                inputs: vec![
                    vec![b, 320, 64, 64],
                    vec![320, 320, 3, 3],
                    vec![b, 320, 32, 32],
                ],
                ours: Box::new(conv(2, true)),
                candle: Box::new(conv(2, false)),
            },
        ]
    }

    /// The change one AdamW step makes to the first half of `xs` (as variables) with the second half as their gradients.
    fn adamw(xs: &[Tensor]) -> Result<Vec<Tensor>> {
        let n = xs.len() / 2;
        let vars: Vec<Var> = xs[..n]
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(DType::F32)?))
            .collect::<Result<_>>()?;
        // Σ p ⊙ g has exactly g as the gradient of each p.
        let mut loss = Tensor::zeros((), DType::F32, xs[0].device())?;
        for (v, g) in vars.iter().zip(&xs[n..]) {
            loss = (loss + (v.as_tensor() * g.to_dtype(DType::F32)?)?.sum_all()?)?;
        }
        let store = loss.backward()?;
        let group = Group {
            vars: vars.clone(),
            lr: 1e-3,
        };
        let mut opt = Optimizer::new(
            OptimizerKind::AdamW,
            OptimizerParams::default(),
            vec![group],
        );
        let before: Vec<Tensor> = vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<Result<_>>()?;
        opt.step(&store, 1.0, 1.0, 1.0)?;
        // The updates, not the parameters: an error in an update is small next to the parameter itself.
        vars.iter()
            .zip(&before)
            .map(|(v, b)| v.as_tensor() - b)
            .collect()
    }

    fn max_rel_error(gpu: &[Tensor], cpu: &[Tensor]) -> Result<f64> {
        let mut worst = 0f64;
        for (a, b) in gpu.iter().zip(cpu) {
            let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
            let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
            worst = worst.max(diff / scale.max(1e-12));
        }
        Ok(worst)
    }

    /// Median wall time of `run` on the GPU over a few repetitions, synchronised, after one warm-up.
    fn time(run: &Run, xs: &[Tensor], device: &Device) -> Result<f64> {
        let mut times = Vec::new();
        for i in 0..6 {
            device.synchronize()?;
            let start = Instant::now();
            drop(run(xs)?);
            device.synchronize()?;
            if i > 0 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    pub fn all(batch: usize, only: &str) -> Result<Vec<Row>> {
        let (device, warning) = crate::device::best();
        if !device.is_cuda() {
            candle_core::bail!(
                "{}",
                warning.unwrap_or_else(|| "no CUDA GPU is in use".into())
            );
        }
        let mut rows = Vec::new();
        for case in cases(batch).into_iter().filter(|c| c.op.contains(only)) {
            let reference = (case.ours)(&inputs(&case.inputs, DType::F32, &Device::Cpu)?)?;
            let xs = inputs(&case.inputs, DType::BF16, &device)?;
            let max_rel_error = max_rel_error(&(case.ours)(&xs)?, &reference)?;
            rows.push(Row {
                op: case.op,
                max_rel_error,
                ours_ms: time(&case.ours, &xs, &device)?,
                candle_ms: time(&case.candle, &xs, &device)?,
            });
        }
        Ok(rows)
    }

    pub fn table(rows: &[Row]) -> String {
        let mut s = String::from(
            "our kernels and ops vs the candle ops they replace (bf16 on the GPU, launched from the host; error vs \
             the CPU's f32)\n\
             | op | max rel. error | ours | candle's | speed-up |\n|---|---:|---:|---:|---:|\n",
        );
        for r in rows {
            s += &format!(
                "| {} | {:.1e} | {:.2} ms | {:.2} ms | {:.1}× |\n",
                r.op,
                r.max_rel_error,
                r.ours_ms,
                r.candle_ms,
                r.candle_ms / r.ours_ms
            );
        }
        s
    }
}
