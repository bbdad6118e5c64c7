//! 8-bit block-wise quantization of optimizer moments, as bitsandbytes stores them: each block of 256 values
//! keeps its largest magnitude (`absmax`, f32) and each value the index of the nearest entry of a 256-entry
//! "dynamic" code (an exponent-and-fraction table dense near 0). The signed code holds first moments, the unsigned
//! one second moments. As bitsandbytes' CPU kernels do, a value divided by its block's absmax is first rounded to
//! one of 65536 steps over [−1, 1], then to the nearest code entry: that keeps a tiny second moment off zero
//! (rounded to zero, it would divide a first moment by ε alone). Everything is tensor ops, so the state stays on
//! the device.

use candle_core::{DType, Device, Result, Tensor};

/// Values per block (bitsandbytes' block size for optimizer state).
pub const BLOCK: usize = 256;
/// Smaller variables keep f32 moments, as bitsandbytes' `min_8bit_size` does: the 8-bit saving is nil there.
pub const MIN_8BIT_SIZE: usize = 4096;

/// The dynamic quantization map of bitsandbytes (`create_dynamic_map` with 7 exponent bits): for each exponent
/// 10^-6 … 10^0, the midpoints of an even split of [0.1, 1] into 2^e (signed) or 2^(e+1) (unsigned) parts,
/// with their negatives when signed, then 0 and 1, padded with zeros to 256 entries and sorted.
pub fn dynamic_map(signed: bool) -> Vec<f32> {
    const EXPONENT_BITS: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..EXPONENT_BITS {
        let items = if signed {
            (1 << i) + 1
        } else {
            (1 << (i + 1)) + 1
        };
        // torch.linspace(0.1, 1, items) in f32, then the means of neighbours in f32.
        let bounds: Vec<f32> = (0..items).map(|k| linspace(0.1, 1.0, items, k)).collect();
        let scale = 10f64.powi(-(EXPONENT_BITS - 1) + i);
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push((scale * f64::from(mean)) as f32);
            if signed {
                data.push((-scale * f64::from(mean)) as f32);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    data
}

/// torch.linspace's k-th of n points in f32: it steps from the start for the first half and back from the end
/// for the second, which gives the exact end points.
fn linspace(start: f32, end: f32, n: usize, k: usize) -> f32 {
    let step = (end - start) / (n - 1) as f32;
    if k < n / 2 {
        start + step * k as f32
    } else {
        end - step * (n - 1 - k) as f32
    }
}

/// A code table on a device, with the midpoints between its entries for rounding to the nearest.
pub struct Code {
    values: Tensor,
    /// `below[j]` is the midpoint under entry j (−∞ for entry 0).
    below: Tensor,
}

impl Code {
    pub fn new(signed: bool, device: &Device) -> Result<Code> {
        let values = dynamic_map(signed);
        let below: Vec<f32> = std::iter::once(f32::NEG_INFINITY)
            .chain(values.windows(2).map(|w| (w[0] + w[1]) / 2.0))
            .collect();
        Ok(Code {
            values: Tensor::new(values, device)?,
            below: Tensor::new(below, device)?,
        })
    }

    /// The values of `q` (u8 indices, any shape) times their block's `absmax`.
    pub fn dequantize(&self, q: &Tensor, absmax: &Tensor) -> Result<Tensor> {
        let n = q.elem_count();
        // As u32: candle reads the largest id of a type (255 for u8) as "none" and gives 0 for it.
        let ids = q.flatten_all()?.to_dtype(DType::U32)?;
        let flat = self.values.index_select(&ids, 0)?;
        let blocks = by_block(&flat, n)?;
        let scaled = blocks.broadcast_mul(&absmax.unsqueeze(1)?)?;
        scaled.flatten_all()?.narrow(0, 0, n)?.reshape(q.shape())
    }

    /// (indices as u8 in `x`'s shape, absmax per block): each value divided by its block's largest magnitude,
    /// rounded to the 16-bit grid, then to the nearest code entry (a tie to the lower one).
    pub fn quantize(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = x.elem_count();
        let blocks = by_block(&x.flatten_all()?, n)?;
        let absmax = blocks.abs()?.max_keepdim(1)?;
        // Times the reciprocal, as bitsandbytes does: a quotient can round the other way at a midpoint.
        let scaled = blocks
            .broadcast_mul(&absmax.clamp(1e-38f32, f32::MAX)?.recip()?)?
            .clamp(-1f32, 1f32)?
            .flatten_all()?
            .narrow(0, 0, n)?;
        // ((v + 1) · ½ · 65535 + ½) truncated: the grid step bitsandbytes' lookup table is indexed by.
        let step = scaled
            .affine(1.0, 1.0)?
            .affine(0.5, 0.0)?
            .affine(65535.0, 0.5)?
            .floor()?;
        let scaled = step.affine(2.0 / 65535.0, -1.0)?;
        Ok((
            self.nearest(&scaled)?.reshape(x.shape())?,
            absmax.flatten_all()?,
        ))
    }

    /// For each value, the number of midpoints below it: the index of the nearest code entry. A binary search
    /// of eight halvings over the sorted midpoints, so memory stays one index per value.
    fn nearest(&self, scaled: &Tensor) -> Result<Tensor> {
        let mut index = Tensor::zeros(scaled.shape(), DType::U32, scaled.device())?;
        for half in [128u32, 64, 32, 16, 8, 4, 2, 1] {
            let probe = index.affine(1.0, f64::from(half))?;
            let below = self.below.index_select(&probe, 0)?.lt(scaled)?;
            index = below.where_cond(&probe, &index)?;
        }
        index.to_dtype(DType::U8)
    }
}

/// The signed code (first moments) and the unsigned one (second moments) on one device.
pub struct Codes {
    pub signed: Code,
    pub unsigned: Code,
}

impl Codes {
    pub fn new(device: &Device) -> Result<Codes> {
        Ok(Codes {
            signed: Code::new(true, device)?,
            unsigned: Code::new(false, device)?,
        })
    }
}

/// The number of blocks `n` values take (the last one may be partial).
pub fn blocks(n: usize) -> usize {
    n.div_ceil(BLOCK)
}

/// `flat` (n values) as [blocks, BLOCK] rows, the last one padded with zeros (which change no block's absmax).
fn by_block(flat: &Tensor, n: usize) -> Result<Tensor> {
    let padded = blocks(n) * BLOCK;
    let flat = if padded > n {
        let pad = Tensor::zeros(padded - n, flat.dtype(), flat.device())?;
        Tensor::cat(&[flat, &pad], 0)?
    } else {
        flat.clone()
    };
    flat.reshape((blocks(n), BLOCK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maps_are_bitsandbytes_dynamic_maps() {
        let signed = dynamic_map(true);
        let unsigned = dynamic_map(false);
        // Values printed by bitsandbytes 0.50.2's create_dynamic_map.
        for (ours, theirs) in signed[..5]
            .iter()
            .zip([-0.9930f32, -0.9789, -0.9648, -0.9508, -0.9367])
        {
            assert!((ours - theirs).abs() < 1e-4, "{ours} vs {theirs}");
        }
        assert_eq!(signed[255], 1.0);
        assert_eq!(signed.iter().filter(|v| **v == 0.0).count(), 1);
        assert_eq!(unsigned[0], 0.0);
        assert!((unsigned[1] - 3.25e-7).abs() < 1e-12);
        assert_eq!(unsigned[255], 1.0);
        assert!(signed.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn quantization_rounds_to_the_nearest_entry_per_block_on_the_16_bit_grid() {
        let code = Code::new(true, &Device::Cpu).unwrap();
        let table = dynamic_map(true);
        // Two full blocks with different ranges and a partial third block.
        let values: Vec<f32> = (0..600)
            .map(|i| ((i as f32) * 0.37).sin() * if i < 256 { 1e-3 } else { 5.0 })
            .collect();
        let x = Tensor::new(values.clone(), &Device::Cpu).unwrap();
        let (q, absmax) = code.quantize(&x).unwrap();
        assert_eq!(absmax.dims(), &[3]);
        let absmax = absmax.to_vec1::<f32>().unwrap();
        let q = q.to_vec1::<u8>().unwrap();
        for (i, v) in values.iter().enumerate() {
            let exact = v * (1.0 / absmax[i / BLOCK]);
            let scaled = ((((exact + 1.0) * 0.5) * 65535.0 + 0.5).floor() / 65535.0) * 2.0 - 1.0;
            let best = (0..256)
                .min_by(|&a, &b| {
                    (table[a] - scaled)
                        .abs()
                        .total_cmp(&(table[b] - scaled).abs())
                })
                .unwrap();
            assert!(
                (table[q[i] as usize] - scaled).abs() <= (table[best] - scaled).abs() + 1e-7,
                "value {i}: {scaled} → {} not {}",
                table[q[i] as usize],
                table[best]
            );
        }
        let cpu = &Device::Cpu;
        let back = code
            .dequantize(
                &Tensor::new(q, cpu).unwrap(),
                &Tensor::new(&absmax[..], cpu).unwrap(),
            )
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, (v, b)) in values.iter().zip(&back).enumerate() {
            // The coarsest code step is 0.9/64 of the block's range.
            assert!((v - b).abs() <= 0.0071 * absmax[i / BLOCK], "{v} → {b}");
        }
    }
}
