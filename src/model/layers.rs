//! The building blocks of our trainable networks.
//!
//! Every adaptable layer holds a frozen base weight and any number of LoRA adapters:
//! `y = base(x) + Σ multiplier · alpha/rank · up(down(x))`. The base op is a custom op whose backward
//! returns only the input gradient: candle's stock matmul/conv backward also computes a weight-sized gradient
//! for the frozen weight, which doubles backward work and memory for nothing.
//! Norms and softmax are written from differentiable primitives (candle's fused ones cut the gradient).

use candle_core::{CustomOp1, D, DType, Device, Result, Tensor, Var};
use std::sync::atomic::{AtomicU64, Ordering};

/// Multiply-add FLOPs of base layers and attention run so far (forward only): how benchmarks count the work of
/// a network without a table per architecture.
static FORWARD_FLOPS: AtomicU64 = AtomicU64::new(0);

/// The forward FLOPs counted since the last call (and resets the count).
pub fn take_forward_flops() -> u64 {
    FORWARD_FLOPS.swap(0, Ordering::Relaxed)
}

fn count_flops(n: usize) {
    FORWARD_FLOPS.fetch_add(n as u64, Ordering::Relaxed);
}

/// The frozen base of a layer, `x @ wᵀ + b` or `conv(x, w) + b`: computed outside the graph, bias included, and
/// handed to this op, which carries only the input gradient. (Within the graph, a bias add would leave an
/// activation-sized gradient for the constant bias in candle's gradient store until backward ends, and a stock
/// matmul/conv would also compute a weight gradient.)
struct FrozenBase {
    y: super::handoff::Handoff,
    w: Tensor,
    shape: AdapterShape,
}

impl FrozenBase {
    /// dx of a conv: a stride-1 conv of the output gradient — dilated by the stride (zeros between its
    /// elements, plus the rows and columns the forward's rounding dropped) — with the kernel transposed (in↔out)
    /// and flipped. candle's conv_transpose2d, the textbook form, is a naive kernel on CUDA (~12× slower). The
    /// flipped kernel is made per backward rather than cached: a second copy of every conv weight would cost
    /// ~1 GB for SD1.5, more than its few small kernels cost in time.
    fn conv_input_grad(
        &self,
        x: &Tensor,
        g: &Tensor,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor> {
        let (_, _, kh, _) = self.w.dims4()?;
        let flipped = self
            .w
            .transpose(0, 1)?
            .contiguous()?
            .flip(&[2, 3])?
            .contiguous()?;
        let g = if stride == 1 {
            g.clone()
        } else {
            let (_, _, h, w) = x.dims4()?;
            let (h_out, w_out) = (h + 2 * padding + 1 - kh, w + 2 * padding + 1 - kh);
            dilate(&dilate(g, 2, stride, h_out)?, 3, stride, w_out)?
        };
        conv2d(&g, &flipped, None, kh - 1 - padding, 1)
    }
}

/// `x.conv2d(w, padding, stride, 1, 1)` plus the per-channel `bias`, with our faster form on the GPU.
fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fused::on(x.device()) {
        return super::fused::conv2d(x, w, bias, padding, stride);
    }
    let y = x.conv2d(w, padding, stride, 1, 1)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

/// `t` with `stride − 1` zeros after each element along `dim`, cut to `len` elements.
fn dilate(t: &Tensor, dim: usize, stride: usize, len: usize) -> Result<Tensor> {
    let mut parts = vec![t.unsqueeze(dim + 1)?];
    let zeros = parts[0].zeros_like()?;
    parts.extend(std::iter::repeat_n(zeros, stride - 1));
    let mut dims = t.dims().to_vec();
    dims[dim] *= stride;
    Tensor::cat(&parts, dim + 1)?
        .reshape(dims)?
        .narrow(dim, 0, len)
}

impl CustomOp1 for FrozenBase {
    fn name(&self) -> &'static str {
        "frozen-base"
    }

    super::handoff::forward_from_handoff!(y);

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(match self.shape {
            AdapterShape::Linear => g.matmul(&self.w)?,
            AdapterShape::Conv {
                stride, padding, ..
            } => self.conv_input_grad(x, g, stride, padding)?,
        }))
    }
}

/// `x` is 2-D for a linear layer, [B, C, H, W] for a conv.
fn frozen_base(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    shape: AdapterShape,
) -> Result<Tensor> {
    let xd = x.detach();
    let y = match shape {
        AdapterShape::Linear => {
            let y = xd.matmul(&w.t()?)?;
            match bias {
                Some(b) => add_bias(y, b)?,
                None => y,
            }
        }
        AdapterShape::Conv {
            stride, padding, ..
        } => conv2d(&xd, w, bias, padding, stride)?,
    };
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(FrozenBase {
        y: super::handoff::Handoff::new(y),
        w: w.clone(),
        shape,
    })
}

/// A matmul's fresh output `y` [N, out] plus the bias `b` [out] (in place on the GPU).
fn add_bias(y: Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fused::on(y.device()) && y.is_contiguous() {
        super::fused::add_bias(&y, b)?;
        return Ok(y);
    }
    y.broadcast_add(b)
}

/// GEGLU of a projection `p` holding the value and the gate side by side on its last dimension: value ·
/// gelu(gate), exact (erf) GELU, as one graph node. From candle ops it is a gelu and a product over strided
/// halves — on the GPU the slowest elementwise kernels of an SD step — and more nodes in backward.
pub fn geglu(p: &Tensor) -> Result<Tensor> {
    let y = geglu_values(&p.detach())?;
    if !p.track_op() {
        return Ok(y);
    }
    p.apply_op1(Geglu(super::handoff::Handoff::new(y)))
}

/// GEGLU's output: our kernel on the GPU, candle's ops elsewhere.
fn geglu_values(p: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fused::on(p.device()) {
        return super::fused::geglu_forward(p);
    }
    geglu_composite(p)
}

fn geglu_composite(p: &Tensor) -> Result<Tensor> {
    let half = p.dim(D::Minus1)? / 2;
    p.narrow(D::Minus1, 0, half)? * p.narrow(D::Minus1, half, half)?.gelu_erf()?
}

/// Carries GEGLU's gradient: d value = g · gelu(gate), d gate = g · value · gelu'(gate), where
/// gelu'(x) = Φ(x) + x·φ(x).
struct Geglu(super::handoff::Handoff);

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    super::handoff::forward_from_handoff!(0);

    fn bwd(&self, p: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let p = p.detach();
        #[cfg(feature = "cuda")]
        if super::fused::on(p.device()) {
            return super::fused::geglu_backward(&p, g).map(Some);
        }
        let half = p.dim(D::Minus1)? / 2;
        let (v, x) = (
            p.narrow(D::Minus1, 0, half)?,
            p.narrow(D::Minus1, half, half)?,
        );
        let cdf = ((x.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)? * 0.5)?;
        let pdf = (x.sqr()?.affine(-0.5, 0.0)?.exp()?
            * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
        let d_value = (g * (&x * &cdf)?)?;
        let d_gate = ((g * v)? * (cdf + (x * pdf)?)?)?;
        Ok(Some(Tensor::cat(&[d_value, d_gate], D::Minus1)?))
    }
}

/// A frozen linear layer with one LoRA adapter, `x·Wᵀ + b + s·(x·downᵀ)·upᵀ`, as one graph node. Built from
/// candle ops it is eleven nodes (casts, transposes, two matmuls, scale, add), each of which costs gradient
/// bookkeeping kernels in backward; this op's backward is five matmuls.
fn lora_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, a: &Lora) -> Result<Tensor> {
    let dt = x.dtype();
    let down = a.down.as_tensor().detach().to_dtype(dt)?;
    let up = a.up.as_tensor().detach().to_dtype(dt)?;
    let xd = x.detach();
    let h = xd.matmul(&down.t()?)?;
    let mut y = xd.matmul(&w.t()?)?;
    if let Some(b) = bias {
        y = add_bias(y, b)?;
    }
    let y = (y + h.matmul(&up.t()?)?.affine(a.scale(), 0.0)?)?;
    x.apply_op3(
        a.down.as_tensor(),
        a.up.as_tensor(),
        LoraLinear {
            y: super::handoff::Handoff::new(y),
            w: w.clone(),
            down,
            up,
            h,
            scale: a.scale(),
        },
    )
}

/// Carries the gradients of `lora_linear` to x, down and up.
struct LoraLinear {
    y: super::handoff::Handoff,
    w: Tensor,
    /// The adapter in the compute dtype, as the forward used it.
    down: Tensor,
    up: Tensor,
    /// x·downᵀ from the forward, [N, rank].
    h: Tensor,
    scale: f64,
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        self.y.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.y.cuda()
    }

    /// With gu = g·up: dx = g·W + s·gu·down, d down = s·guᵀ·x, d up = s·gᵀ·h (adapter gradients in f32).
    fn bwd(
        &self,
        x: &Tensor,
        _down: &Tensor,
        _up: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self.scale;
        let gu = g.matmul(&self.up)?;
        let dx = if x.track_op() {
            Some((g.matmul(&self.w)? + gu.matmul(&self.down)?.affine(s, 0.0)?)?)
        } else {
            None
        };
        let d_down = gu.t()?.matmul(&x.detach())?.affine(s, 0.0)?;
        let d_up = g.t()?.matmul(&self.h)?.affine(s, 0.0)?;
        Ok((
            dx,
            Some(d_down.to_dtype(DType::F32)?),
            Some(d_up.to_dtype(DType::F32)?),
        ))
    }
}

/// `x + c` for a constant `c` (broadcast to `x`), without the gradient for `c` that a stock add would keep in
/// candle's gradient store until backward ends.
pub fn add_constant(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    if c.track_op() || !x.track_op() {
        return x.broadcast_add(c);
    }
    x.apply_op1(PassGradient(super::handoff::Handoff::new(
        x.detach().broadcast_add(c)?,
    )))
}

/// An op whose gradient is the incoming gradient unchanged (an added constant).
struct PassGradient(super::handoff::Handoff);

impl CustomOp1 for PassGradient {
    fn name(&self) -> &'static str {
        "add-constant"
    }

    super::handoff::forward_from_handoff!(0);

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.clone()))
    }
}

/// What a LoRA adapter applies to: a linear layer, or a conv with the base layer's kernel, stride, padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterShape {
    Linear,
    Conv {
        kernel: usize,
        stride: usize,
        padding: usize,
    },
}

/// One LoRA adapter: `down` [r, in] or [r, in, k, k], `up` [out, r] or [out, r, 1, 1], kept in f32 (master
/// weights) and cast to the compute dtype in forward.
#[derive(Clone, Debug)]
pub struct Lora {
    pub down: Var,
    pub up: Var,
    pub alpha: f64,
    pub multiplier: f64,
    /// Dropout on the down projection's output (kohya's `network_dropout`), applied only inside
    /// [`with_dropout_key`].
    pub dropout: f64,
}

thread_local! {
    static DROPOUT_KEY: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` (a training forward and its backward) with adapter dropout on. The masks are a function of `key`,
/// the layer and the adapter only, so the forward that recompute repeats inside the backward draws the same
/// masks, and a resumed run the same as the uninterrupted one. Outside it (sampling, inference) there is none.
pub fn with_dropout_key<T>(key: u64, f: impl FnOnce() -> T) -> T {
    let before = DROPOUT_KEY.replace(Some(key));
    let out = f();
    DROPOUT_KEY.set(before);
    out
}

/// Inverted dropout of `h`: each element kept with probability 1 − p and scaled by 1 / (1 − p). The mask is
/// drawn on the host from (key, salt), so it is the same on every device.
fn dropout(h: &Tensor, p: f64, salt: u64) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let Some(key) = DROPOUT_KEY.get() else {
        return Ok(h.clone());
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(key);
    rng.set_stream(salt);
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..h.elem_count())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect();
    let mask = crate::device::upload_uncached(mask, h.dims(), h.device())?.to_dtype(h.dtype())?;
    h.mul(&mask)
}

/// A stable number for a layer path and adapter index (FNV-1a), to tell the layers' dropout masks apart.
fn dropout_salt(path: &str, index: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes().chain((index as u64).to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Lora {
    pub fn rank(&self) -> usize {
        self.down.dim(0).unwrap_or(1)
    }

    pub fn scale(&self) -> f64 {
        self.multiplier * self.alpha / self.rank().max(1) as f64
    }

    /// The adapter's output for `x`; `path` and `index` (the layer and the adapter's place in it) key its
    /// dropout masks.
    fn forward(&self, x: &Tensor, shape: AdapterShape, path: &str, index: usize) -> Result<Tensor> {
        let dt = x.dtype();
        let down = self.down.as_tensor().to_dtype(dt)?;
        let up = self.up.as_tensor().to_dtype(dt)?;
        let mut h = match shape {
            AdapterShape::Linear => x.matmul(&down.t()?)?,
            AdapterShape::Conv {
                stride, padding, ..
            } => x.conv2d(&down, padding, stride, 1, 1)?,
        };
        if self.dropout > 0.0 {
            h = dropout(&h, self.dropout, dropout_salt(path, index))?;
        }
        let y = match shape {
            AdapterShape::Linear => h.matmul(&up.t()?)?,
            AdapterShape::Conv { .. } => h.conv2d(&up, 0, 1, 1, 1)?,
        };
        y.affine(self.scale(), 0.0)
    }

    /// Whether this forward applies dropout (see `with_dropout_key`).
    fn dropout_active(&self) -> bool {
        self.dropout > 0.0 && DROPOUT_KEY.get().is_some()
    }

    /// The change this adapter makes to the base weight (`scale · up @ down`), for merging.
    pub fn delta(&self) -> Result<Tensor> {
        let m = crate::lora::LoraModule {
            down: self.down.as_tensor().clone(),
            up: self.up.as_tensor().clone(),
            alpha: self.alpha as f32,
        };
        m.delta(self.multiplier)
    }
}

/// A frozen Linear or Conv2d with optional adapters, named by its diffusers module path.
pub struct Adaptable {
    pub path: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub shape: AdapterShape,
    pub adapters: Vec<Lora>,
}

impl Adaptable {
    pub fn new(path: &str, weight: Tensor, bias: Option<Tensor>, shape: AdapterShape) -> Self {
        Adaptable {
            path: path.to_owned(),
            weight,
            bias,
            shape,
            adapters: vec![],
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    pub fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.shape {
            AdapterShape::Linear => {
                let dims = x.dims().to_vec();
                let (lead, last) = dims.split_at(dims.len() - 1);
                let x2 = x.reshape(((), last[0]))?;
                count_flops(2 * x2.dim(0)? * self.weight.elem_count());
                let x2 = x2.contiguous()?;
                let mut y = match self.adapters.as_slice() {
                    [a] if !a.dropout_active() => {
                        lora_linear(&x2, &self.weight, self.bias.as_ref(), a)?
                    }
                    adapters => {
                        let mut y = frozen_base(&x2, &self.weight, self.bias.as_ref(), self.shape)?;
                        for (i, a) in adapters.iter().enumerate() {
                            y = (y + a.forward(&x2, self.shape, &self.path, i)?)?;
                        }
                        y
                    }
                };
                let mut out_dims = lead.to_vec();
                out_dims.push(self.out_features());
                y = y.reshape(out_dims)?;
                Ok(y)
            }
            AdapterShape::Conv { .. } => {
                let mut y = frozen_base(x, &self.weight, self.bias.as_ref(), self.shape)?;
                let (b, _, h, w) = y.dims4()?;
                count_flops(2 * b * h * w * self.weight.elem_count());
                for (i, a) in self.adapters.iter().enumerate() {
                    y = (y + a.forward(x, self.shape, &self.path, i)?)?;
                }
                Ok(y)
            }
        }
    }

    /// Adds a new trainable adapter: `down` kaiming-uniform (a = √5, as kohya and PEFT), `up` zero, so the
    /// layer starts out unchanged.
    pub fn add_adapter(
        &mut self,
        rank: usize,
        alpha: f64,
        rng: &mut impl rand::Rng,
    ) -> Result<&Lora> {
        let dev = self.weight.device().clone();
        let (down_shape, up_shape): (Vec<usize>, Vec<usize>) = match self.shape {
            AdapterShape::Linear => (
                vec![rank, self.in_features()],
                vec![self.out_features(), rank],
            ),
            AdapterShape::Conv { kernel, .. } => (
                vec![rank, self.in_features(), kernel, kernel],
                vec![self.out_features(), rank, 1, 1],
            ),
        };
        let fan_in: usize = down_shape[1..].iter().product();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let n: usize = down_shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
        let down = Var::from_tensor(&Tensor::from_vec(values, down_shape, &dev)?)?;
        let up = Var::zeros(up_shape, DType::F32, &dev)?;
        self.adapters.push(Lora {
            down,
            up,
            alpha,
            multiplier: 1.0,
            dropout: 0.0,
        });
        Ok(self.adapters.last().expect("just pushed"))
    }

    /// Folds `delta` (same shape as the weight) into the base weight, for speed when an adapter is fixed.
    pub fn merge(&mut self, delta: &Tensor) -> Result<()> {
        let dt = self.weight.dtype();
        self.weight =
            (self.weight.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?.to_dtype(dt)?;
        Ok(())
    }
}

/// Where the layers of a network come from: the weight source, the dtype and the device.
pub struct Loader<'a> {
    pub weights: &'a dyn crate::model::weights::Weights,
    pub dtype: DType,
    pub device: Device,
}

impl Loader<'_> {
    /// A tensor of the expected shape (a checkpoint that disagrees gets an error naming the tensor).
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights
            .get_shaped(name, shape, self.dtype, &self.device)
    }

    /// Norm parameters stay in f32: they are tiny and the norms compute in f32.
    fn tensor_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights
            .get_shaped(name, shape, DType::F32, &self.device)
    }

    pub fn linear(&self, path: &str, cin: usize, cout: usize, bias: bool) -> Result<Adaptable> {
        let weight = self.tensor(&format!("{path}.weight"), &[cout, cin])?;
        let bias = if bias {
            Some(self.tensor(&format!("{path}.bias"), &[cout])?)
        } else {
            None
        };
        Ok(Adaptable::new(path, weight, bias, AdapterShape::Linear))
    }

    /// A conv2d with a square `kernel` and a bias.
    pub fn conv(
        &self,
        path: &str,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Adaptable> {
        let weight = self.tensor(&format!("{path}.weight"), &[cout, cin, kernel, kernel])?;
        let bias = Some(self.tensor(&format!("{path}.bias"), &[cout])?);
        Ok(Adaptable::new(
            path,
            weight,
            bias,
            AdapterShape::Conv {
                kernel,
                stride,
                padding,
            },
        ))
    }

    /// A projection that is a 1×1 conv (SD1's proj_in/proj_out) or a Linear (SD2's).
    pub fn projection(
        &self,
        path: &str,
        cin: usize,
        cout: usize,
        as_conv: bool,
    ) -> Result<Adaptable> {
        if as_conv {
            self.conv(path, cin, cout, 1, 1, 0)
        } else {
            self.linear(path, cin, cout, true)
        }
    }

    pub fn group_norm(
        &self,
        path: &str,
        channels: usize,
        groups: usize,
        eps: f64,
    ) -> Result<GroupNorm> {
        Ok(GroupNorm {
            weight: self.tensor_f32(&format!("{path}.weight"), &[channels])?,
            bias: self.tensor_f32(&format!("{path}.bias"), &[channels])?,
            groups,
            eps,
        })
    }

    pub fn layer_norm(&self, path: &str, channels: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.tensor_f32(&format!("{path}.weight"), &[channels])?,
            bias: self.tensor_f32(&format!("{path}.bias"), &[channels])?,
            eps,
        })
    }
}

/// Group normalisation over [B, C, H, W] with frozen affine parameters (see `normalize`).
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// From f32 `[C]` weight and bias.
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Self {
        GroupNorm {
            weight,
            bias,
            groups,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let shape = NormShape {
            rows: b * self.groups,
            inner: h * w,
            channels: c,
        };
        normalize(x, shape, (&self.weight, &self.bias), self.eps)
    }
}

/// Layer normalisation over the last dimension with frozen affine parameters (see `normalize`).
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// From f32 `[C]` weight and bias.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        LayerNorm { weight, bias, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let channels = x.dim(D::Minus1)?;
        let shape = NormShape {
            rows: x.elem_count() / channels,
            inner: 1,
            channels,
        };
        normalize(x, shape, (&self.weight, &self.bias), self.eps)
    }
}

/// How a norm sees its input: `rows` rows normalised separately, and flat element e scaled by channel
/// (e / inner) % channels of the affine weight and bias (GroupNorm: inner = H·W; LayerNorm: inner = 1).
#[derive(Clone, Copy)]
pub struct NormShape {
    pub rows: usize,
    pub inner: usize,
    pub channels: usize,
}

impl NormShape {
    /// `x` viewed as [.., channels, inner], and the per-channel `[channels]` tensor `p` broadcastable to it.
    fn affine_view(&self, x: &Tensor, p: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = x.reshape(((), self.channels, self.inner))?;
        Ok((x, p.reshape((1, self.channels, 1))?))
    }
}

/// Normalises `x` by rows (mean 0, variance 1 per row, in f32), then applies the frozen per-channel `(weight,
/// bias)`. For training it is one custom op that keeps only each row's mean and 1/σ: built from primitives, a
/// norm keeps four f32 copies of its input for backward — the largest memory item of a UNet step after attention.
fn normalize(x: &Tensor, s: NormShape, (w, b): (&Tensor, &Tensor), eps: f64) -> Result<Tensor> {
    let (y, mean, rstd) = norm_values(&x.detach(), s, (w, b), eps)?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(Norm {
        y: super::handoff::Handoff::new(y),
        mean,
        rstd,
        weight: w.clone(),
        shape: s,
    })
}

/// The output of `normalize` and each row's mean and 1/σ ([rows, 1], f32).
fn norm_values(
    x: &Tensor,
    s: NormShape,
    (w, b): (&Tensor, &Tensor),
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if super::fused::on(x.device()) {
        return super::fused::norm_forward(x, (w, b), s, eps);
    }
    let xr = x.to_dtype(DType::F32)?.reshape((s.rows, ()))?;
    let mean = xr.mean_keepdim(1)?;
    let xc = xr.broadcast_sub(&mean)?;
    let rstd = (xc.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
    let (xh, wv) = s.affine_view(&xc.broadcast_mul(&rstd)?, w)?;
    let y = xh
        .broadcast_mul(&wv)?
        .broadcast_add(&b.reshape((1, s.channels, 1))?)?
        .reshape(x.shape())?
        .to_dtype(x.dtype())?;
    Ok((y, mean, rstd))
}

/// Carries the input gradient of `normalize`.
struct Norm {
    y: super::handoff::Handoff,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor,
    shape: NormShape,
}

impl CustomOp1 for Norm {
    fn name(&self) -> &'static str {
        "normalize"
    }

    super::handoff::forward_from_handoff!(y);

    /// With x̂ the normalised rows and d = g·w: dx = (d − mean(d) − x̂·mean(d·x̂)) / σ, per row.
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // Detached: ops on the graph node `x` would be recorded and kept alive with the returned gradient.
        let x = &x.detach();
        let s = self.shape;
        #[cfg(feature = "cuda")]
        if super::fused::on(x.device()) {
            let stats = (&self.mean, &self.rstd);
            return super::fused::norm_backward(x, g, stats, &self.weight, s).map(Some);
        }
        let (gv, wv) = s.affine_view(&g.to_dtype(DType::F32)?, &self.weight)?;
        let d = gv.broadcast_mul(&wv)?.reshape((s.rows, ()))?;
        let xh = x
            .to_dtype(DType::F32)?
            .reshape((s.rows, ()))?
            .broadcast_sub(&self.mean)?
            .broadcast_mul(&self.rstd)?;
        let m1 = d.mean_keepdim(1)?;
        let m2 = (&d * &xh)?.mean_keepdim(1)?;
        let dx = (d.broadcast_sub(&m1)? - xh.broadcast_mul(&m2)?)?.broadcast_mul(&self.rstd)?;
        Ok(Some(dx.reshape(x.shape())?.to_dtype(x.dtype())?))
    }
}

/// Multi-head scaled dot-product attention of q [B, Nq, C] over k, v [B, Nk, C] (see `attention`).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    chunk: Option<usize>,
) -> Result<Tensor> {
    let (b, nq, c) = q.dims3()?;
    count_flops(4 * b * nq * k.dim(1)? * c);
    super::attention::attention(q, k, v, heads, chunk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Masks depend only on (key, layer, adapter): the same key repeats them, another key changes them,
    /// outside a key there is no dropout, and the kept fraction and scale keep the expected value.
    #[test]
    fn dropout_masks_are_keyed_and_unbiased() {
        let h = Tensor::ones((64, 32), DType::F32, &Device::Cpu).unwrap();
        let salt = dropout_salt("down_blocks.0.attn1.to_q", 0);
        let outside = dropout(&h, 0.25, salt).unwrap();
        assert_eq!(
            outside.to_vec2::<f32>().unwrap(),
            h.to_vec2::<f32>().unwrap()
        );
        let a = with_dropout_key(1, || dropout(&h, 0.25, salt).unwrap());
        let again = with_dropout_key(1, || dropout(&h, 0.25, salt).unwrap());
        let other_key = with_dropout_key(2, || dropout(&h, 0.25, salt).unwrap());
        let other_layer = with_dropout_key(1, || {
            dropout(&h, 0.25, dropout_salt("down_blocks.0.attn1.to_k", 0)).unwrap()
        });
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&a), v(&again));
        assert_ne!(v(&a), v(&other_key));
        assert_ne!(v(&a), v(&other_layer));
        let zeros = v(&a).iter().filter(|x| **x == 0.0).count() as f64 / 2048.0;
        assert!((zeros - 0.25).abs() < 0.04, "dropped fraction {zeros}");
        let mean = v(&a).iter().sum::<f32>() / 2048.0;
        assert!((mean - 1.0).abs() < 0.06, "mean {mean}");
        assert!(
            v(&a)
                .iter()
                .all(|x| *x == 0.0 || (*x - 4.0 / 3.0).abs() < 1e-6)
        );
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// GEGLU as one node gives candle's composite values and gradient (its autograd through narrow, gelu_erf
    /// and the product).
    #[test]
    fn geglu_matches_the_composite_and_its_gradient() {
        let p = Var::from_tensor(&(randn(&[2, 3, 8], 3) * 3.0).unwrap()).unwrap();
        let w = randn(&[2, 3, 4], 4);
        let ours = geglu(&p).unwrap();
        let reference = geglu_composite(&p).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-6);
        let grad = |y: &Tensor| {
            let g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(&p).unwrap().clone()
        };
        let err = max_diff(&grad(&ours), &grad(&reference));
        assert!(err < 1e-5, "gradients differ by {err}");
    }

    /// The frozen ops give the same values and input gradients as candle's stock ops, and no weight gradient.
    #[test]
    fn frozen_ops_match_stock_autograd_without_weight_grads() {
        for (stride, padding, kernel) in [(1, 1, 3), (2, 1, 3), (1, 0, 1)] {
            let x = Var::from_tensor(&randn(&[2, 3, 8, 8], 1)).unwrap();
            let w = randn(&[5, 3, kernel, kernel], 2);
            let shape = AdapterShape::Conv {
                kernel,
                stride,
                padding,
            };
            let ours = frozen_base(x.as_tensor(), &w, None, shape).unwrap();
            let stock = x.as_tensor().conv2d(&w, padding, stride, 1, 1).unwrap();
            assert!(max_diff(&ours, &stock) < 1e-6);
            let g_ours = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g_stock = stock.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            assert!(
                max_diff(g_ours.get(&x).unwrap(), g_stock.get(&x).unwrap()) < 1e-4,
                "stride {stride}"
            );
            assert!(g_ours.get(&w).is_none());
        }
        let x = Var::from_tensor(&randn(&[6, 4], 3)).unwrap();
        let w = randn(&[7, 4], 4);
        let ours = frozen_base(x.as_tensor(), &w, None, AdapterShape::Linear).unwrap();
        let stock = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&ours, &stock) < 1e-6);
        let g_ours = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_stock = stock.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g_ours.get(&x).unwrap(), g_stock.get(&x).unwrap()) < 1e-5);
    }

    #[test]
    fn adapter_changes_output_by_its_delta_and_merges_to_the_same() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for shape in [
            AdapterShape::Linear,
            AdapterShape::Conv {
                kernel: 3,
                stride: 1,
                padding: 1,
            },
        ] {
            let (w, x) = match shape {
                AdapterShape::Linear => (randn(&[6, 4], 6), randn(&[2, 3, 4], 7)),
                _ => (randn(&[6, 4, 3, 3], 6), randn(&[2, 4, 5, 5], 7)),
            };
            let mut layer = Adaptable::new("l", w, None, shape);
            let base = layer.forward(&x).unwrap();
            layer.add_adapter(2, 1.0, &mut rng).unwrap();
            assert!(
                max_diff(&layer.forward(&x).unwrap(), &base) < 1e-7,
                "up starts at zero"
            );
            let a = &mut layer.adapters[0];
            a.up.set(&randn(a.up.dims(), 8)).unwrap();
            let adapted = layer.forward(&x).unwrap();
            assert!(max_diff(&adapted, &base) > 1e-3);
            let delta = layer.adapters[0].delta().unwrap();
            layer.adapters.clear();
            layer.merge(&delta).unwrap();
            assert!(max_diff(&layer.forward(&x).unwrap(), &adapted) < 1e-5);
        }
    }

    /// The norm op gives the values and input gradients of the same norm built from primitives.
    #[test]
    fn norms_match_their_composite_form() {
        let x = Var::from_tensor(&randn(&[2, 8, 3, 5], 11)).unwrap();
        let w = randn(&[8], 12);
        let b = randn(&[8], 13);
        let gw = randn(&[2, 8, 3, 5], 14);
        let gn = GroupNorm {
            weight: w.clone(),
            bias: b.clone(),
            groups: 4,
            eps: 1e-5,
        };
        let composite = |x: &Tensor| {
            let xg = x.reshape((2, 4, 30)).unwrap();
            let mean = xg.mean_keepdim(D::Minus1).unwrap();
            let xc = xg.broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let y = xc
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .reshape((2, 8, 3, 5))
                .unwrap();
            y.broadcast_mul(&w.reshape((1, 8, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&b.reshape((1, 8, 1, 1)).unwrap())
                .unwrap()
        };
        let ours = gn.forward(&x).unwrap();
        let reference = composite(&x);
        assert!(max_diff(&ours, &reference) < 1e-5);
        let g1 = (&ours * &gw)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&reference * &gw)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-4);
        let ln = LayerNorm {
            weight: randn(&[5], 15),
            bias: randn(&[5], 16),
            eps: 1e-5,
        };
        let y = ln.forward(&x).unwrap();
        let rows = x.as_tensor().reshape((48, 5)).unwrap();
        let mean = rows.mean_keepdim(1).unwrap();
        let xc = rows.broadcast_sub(&mean).unwrap();
        let sd = (xc.sqr().unwrap().mean_keepdim(1).unwrap() + 1e-5)
            .unwrap()
            .sqrt()
            .unwrap();
        let r = xc
            .broadcast_div(&sd)
            .unwrap()
            .broadcast_mul(&ln.weight)
            .unwrap()
            .broadcast_add(&ln.bias)
            .unwrap();
        assert!(max_diff(&y.reshape((48, 5)).unwrap(), &r) < 1e-5);
        let g1 = (&y * &gw).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&r.reshape((2, 8, 3, 5)).unwrap() * &gw)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-4);
    }

    /// The one-node LoRA linear gives stock autograd's output and gradients for x, down and up — and the same
    /// as the per-op path it replaces, which dropout still takes.
    #[test]
    fn lora_linear_matches_stock_autograd() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (w, b) = (randn(&[6, 4], 1), randn(&[6], 2));
        let mut layer = Adaptable::new("l", w.clone(), Some(b.clone()), AdapterShape::Linear);
        layer.add_adapter(2, 3.0, &mut rng).unwrap();
        let a = layer.adapters[0].clone();
        a.up.set(&randn(a.up.dims(), 3)).unwrap();
        let x = Var::from_tensor(&randn(&[2, 3, 4], 4)).unwrap();
        let gw = randn(&[2, 3, 6], 5);
        let ours = layer.forward(x.as_tensor()).unwrap();
        let h = x.as_tensor().matmul(
            &a.down
                .t()
                .unwrap()
                .unsqueeze(0)
                .unwrap()
                .broadcast_as((2, 4, 2))
                .unwrap(),
        );
        let lora = h.unwrap().matmul(
            &a.up
                .t()
                .unwrap()
                .unsqueeze(0)
                .unwrap()
                .broadcast_as((2, 2, 6))
                .unwrap(),
        );
        let stock = (x
            .as_tensor()
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
            + lora.unwrap().affine(1.5, 0.0).unwrap())
        .unwrap();
        assert!(max_diff(&ours, &stock) < 1e-5);
        let g_ours = (&ours * &gw)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_stock = (&stock * &gw)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [
            ("x", x.as_tensor()),
            ("down", a.down.as_tensor()),
            ("up", a.up.as_tensor()),
        ] {
            let err = max_diff(g_ours.get(v).unwrap(), g_stock.get(v).unwrap());
            assert!(err < 1e-4, "d{name} differs by {err}");
        }
        let per_op = with_dropout_key(1, || {
            layer.adapters[0].dropout = 1e-9;
            layer.forward(x.as_tensor()).unwrap()
        });
        assert!(max_diff(&per_op, &ours) < 1e-5);
    }

    #[test]
    fn chunked_attention_equals_whole() {
        let q = randn(&[2, 10, 8], 1);
        let k = randn(&[2, 6, 8], 2);
        let v = randn(&[2, 6, 8], 3);
        let whole = attention(&q, &k, &v, 2, None).unwrap();
        let chunked = attention(&q, &k, &v, 2, Some(3)).unwrap();
        assert!(max_diff(&whole, &chunked) < 1e-6);
    }
}
