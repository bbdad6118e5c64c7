//! The per-variable update rules: each takes a variable's state and its (clipped, unscaled) gradient and returns
//! the direction the caller moves the variable by −lr (after decoupled weight decay). Prodigy, whose step size is
//! shared by all variables, is in `prodigy.rs`.

use super::OptimizerParams;
use super::blockwise::{self, Codes};
use candle_core::{DType, Result, Tensor};

/// AdamW's state for a variable: [m, v] in f32.
pub fn adamw(st: &mut Vec<Tensor>, g: &Tensor, p: &OptimizerParams, step: u64) -> Result<Tensor> {
    if st.is_empty() {
        st.push(g.zeros_like()?);
        st.push(g.zeros_like()?);
    }
    let (m, v) = moments(&st[0], &st[1], g, p)?;
    let direction = adam_direction(&m, &v, p, step)?;
    st[0] = m;
    st[1] = v;
    Ok(direction)
}

/// AdamW with 8-bit moments (bitsandbytes' AdamW8bit): state [m codes (u8), m absmax, v codes (u8), v absmax]
/// for variables of `MIN_8BIT_SIZE` values or more; smaller ones keep AdamW's f32 [m, v]. The step itself is
/// AdamW's, on the dequantized moments; the updated moments are quantized again.
pub fn adamw_8bit(
    st: &mut Vec<Tensor>,
    g: &Tensor,
    p: &OptimizerParams,
    step: u64,
    codes: &Codes,
) -> Result<Tensor> {
    if g.elem_count() < blockwise::MIN_8BIT_SIZE {
        return adamw(st, g, p, step);
    }
    if st.is_empty() {
        let blocks = blockwise::blocks(g.elem_count());
        for _ in 0..2 {
            st.push(g.zeros_like()?.to_dtype(DType::U8)?);
            st.push(Tensor::zeros(blocks, DType::F32, g.device())?);
        }
    }
    let m = codes.signed.dequantize(&st[0], &st[1])?;
    let v = codes.unsigned.dequantize(&st[2], &st[3])?;
    let (m, v) = moments(&m, &v, g, p)?;
    let direction = adam_direction(&m, &v, p, step)?;
    let ((qm, am), (qv, av)) = (codes.signed.quantize(&m)?, codes.unsigned.quantize(&v)?);
    *st = vec![qm, am, qv, av];
    Ok(direction)
}

/// The shapes and dtypes of one variable's AdamW8bit state.
pub fn adamw_8bit_state(dims: &[usize]) -> Vec<(Vec<usize>, DType)> {
    let n: usize = dims.iter().product();
    if n < blockwise::MIN_8BIT_SIZE {
        return vec![(dims.to_vec(), DType::F32); 2];
    }
    let codes = (dims.to_vec(), DType::U8);
    let absmax = (vec![blockwise::blocks(n)], DType::F32);
    vec![codes.clone(), absmax.clone(), codes, absmax]
}

fn moments(m: &Tensor, v: &Tensor, g: &Tensor, p: &OptimizerParams) -> Result<(Tensor, Tensor)> {
    let m = (m.affine(p.beta1, 0.0)? + g.affine(1.0 - p.beta1, 0.0)?)?;
    let v = (v.affine(p.beta2, 0.0)? + g.sqr()?.affine(1.0 - p.beta2, 0.0)?)?;
    Ok((m, v))
}

/// m̂ / (√v̂ + ε) with Adam's bias corrections at `step` (1-based).
fn adam_direction(m: &Tensor, v: &Tensor, p: &OptimizerParams, step: u64) -> Result<Tensor> {
    let t = step as i32;
    let m_hat = m.affine(1.0 / (1.0 - p.beta1.powi(t)), 0.0)?;
    let v_hat = v.affine(1.0 / (1.0 - p.beta2.powi(t)), 0.0)?;
    m_hat / (v_hat.sqrt()? + p.eps)?
}

/// Adafactor (Shazeer & Stern 2018) with the external learning rate, as transformers' `Adafactor(relative_step=
/// False, scale_parameter=False)`: second moment kept as row and column means for matrices (a conv weight is
/// factored as [out, in·k·k], which keeps less state than transformers' last-two-dims split), decay 1 − t^−0.8,
/// update clipped to RMS 1. State: [row, col] (matrices) or [v] (vectors).
pub fn adafactor(st: &mut Vec<Tensor>, g: &Tensor, step: u64) -> Result<Tensor> {
    let decay = 1.0 - (step as f64).powf(-0.8);
    let eps = 1e-30;
    let g2 = (g.sqr()? + eps)?;
    let u = if g.rank() >= 2 {
        let g2 = g2.flatten_from(1)?;
        let (row, col) = (g2.mean_keepdim(1)?, g2.mean_keepdim(0)?);
        if st.is_empty() {
            st.push(row.zeros_like()?);
            st.push(col.zeros_like()?);
        }
        st[0] = (st[0].affine(decay, 0.0)? + row.affine(1.0 - decay, 0.0)?)?;
        st[1] = (st[1].affine(decay, 0.0)? + col.affine(1.0 - decay, 0.0)?)?;
        let row_mean = st[0].mean_all()?;
        let v = st[0].broadcast_div(&row_mean)?.broadcast_mul(&st[1])?;
        g.flatten_from(1)?.div(&v.sqrt()?)?.reshape(g.shape())?
    } else {
        if st.is_empty() {
            st.push(g2.zeros_like()?);
        }
        st[0] = (st[0].affine(decay, 0.0)? + g2.affine(1.0 - decay, 0.0)?)?;
        g.div(&st[0].sqrt()?)?
    };
    let rms = u.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()? as f64;
    u.affine(1.0 / rms.max(1.0), 0.0)
}

/// The shapes of one variable's Adafactor state.
pub fn adafactor_state(dims: &[usize]) -> Vec<(Vec<usize>, DType)> {
    if dims.len() >= 2 {
        let rest = dims[1..].iter().product();
        vec![(vec![dims[0], 1], DType::F32), (vec![1, rest], DType::F32)]
    } else {
        vec![(dims.to_vec(), DType::F32)]
    }
}

/// Lion (Chen et al. 2023, as lion-pytorch): the sign of β1·m + (1 − β1)·g, then m ← β2·m + (1 − β2)·g.
/// State: [m].
pub fn lion(st: &mut Vec<Tensor>, g: &Tensor, p: &OptimizerParams) -> Result<Tensor> {
    if st.is_empty() {
        st.push(g.zeros_like()?);
    }
    let direction = (st[0].affine(p.beta1, 0.0)? + g.affine(1.0 - p.beta1, 0.0)?)?.sign()?;
    st[0] = (st[0].affine(p.beta2, 0.0)? + g.affine(1.0 - p.beta2, 0.0)?)?;
    Ok(direction)
}
