//! Weight-only block quantization for ONNX Runtime's `com.microsoft.MatMulNBits`.
//!
//! A torch-layout weight W [N, K] (out, in) is cut along K into blocks of `block` values. Each block
//! gets one scale `absmax / qmax` (symmetric; `qmax` = 7 for int4, 127 for int8) and its values are
//! stored as `round(w / scale) + zero_point` with the op's default zero point 2^(bits−1), so no
//! zero-point tensor is written. The layout is the op's: B is uint8 [N, k_blocks, block·bits/8],
//! 4-bit values two to a byte with the first in the low nibble; scales are [N · k_blocks] in the
//! activation type; a last partial block is padded with the zero point (the value 0).

use serde::Serialize;

/// How the linears of a graph are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Quant {
    /// 4 or 8.
    pub bits: u8,
    /// Values per block along K: a power of two, at least 16.
    pub block_size: usize,
    /// MatMulNBits' `accuracy_level`: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.
    pub accuracy_level: u8,
    /// Whether `lm_head` is quantized too.
    pub lm_head: bool,
    /// Whether the vision graph's linears (SigLIP, prompt module, connector) are quantized.
    pub vision: bool,
}

impl Quant {
    /// Checks the settings the op accepts.
    pub fn validate(&self) -> Result<(), String> {
        if self.bits != 4 && self.bits != 8 {
            return Err(format!("quantization to {} bits: 4 or 8 are supported", self.bits));
        }
        if self.block_size < 16 || !self.block_size.is_power_of_two() {
            return Err(format!("block size {}: a power of two, at least 16", self.block_size));
        }
        if self.accuracy_level > 4 {
            return Err(format!("accuracy level {}: 0 to 4", self.accuracy_level));
        }
        Ok(())
    }

    /// `int4` / `int8`.
    pub fn name(&self) -> String {
        format!("int{}", self.bits)
    }

    /// Whether the weight named `key` (a checkpoint key) is quantized in a graph of this kind.
    pub fn applies(&self, key: &str) -> bool {
        key != "lm_head.weight" || self.lm_head
    }

    /// Blocks along K.
    pub fn k_blocks(&self, k: usize) -> usize {
        k.div_ceil(self.block_size)
    }

    /// Bytes of one block in B.
    pub fn blob_bytes(&self) -> usize {
        self.block_size * self.bits as usize / 8
    }

    /// The largest stored magnitude: values are in `[-qmax, qmax]`.
    fn qmax(&self) -> f32 {
        ((1u32 << (self.bits - 1)) - 1) as f32
    }

    /// The op's default zero point, 2^(bits−1).
    pub fn zero_point(&self) -> u8 {
        1u8 << (self.bits - 1)
    }

    /// Scales [N · k_blocks] of W [N, K] (row-major `w`).
    pub fn scales(&self, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let kb = self.k_blocks(k);
        let mut out = Vec::with_capacity(n * kb);
        for row in w.chunks(k).take(n) {
            for blk in row.chunks(self.block_size) {
                let absmax = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
                // An all-zero block gets scale 1 rather than 0: its values are 0 either way.
                out.push(if absmax > 0.0 { absmax / self.qmax() } else { 1.0 });
            }
        }
        out
    }

    /// B [N, k_blocks, blob] of W [N, K] (row-major `w`), quantized with [`Quant::scales`].
    pub fn pack(&self, w: &[f32], n: usize, k: usize) -> Vec<u8> {
        let scales = self.scales(w, n, k);
        let (kb, blob, zp, qmax) = (self.k_blocks(k), self.blob_bytes(), self.zero_point(), self.qmax());
        let mut out = vec![0u8; n * kb * blob];
        for (r, row) in w.chunks(k).take(n).enumerate() {
            for b in 0..kb {
                let s = scales[r * kb + b];
                let dst = &mut out[(r * kb + b) * blob..(r * kb + b + 1) * blob];
                let q = |i: usize| -> u8 {
                    let x = row.get(b * self.block_size + i).copied().unwrap_or(0.0);
                    ((x / s).round().clamp(-qmax, qmax) as i32 + zp as i32) as u8
                };
                match self.bits {
                    4 => {
                        for (j, byte) in dst.iter_mut().enumerate() {
                            *byte = q(2 * j) | (q(2 * j + 1) << 4);
                        }
                    }
                    _ => {
                        for (j, byte) in dst.iter_mut().enumerate() {
                            *byte = q(j);
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(bits: u8, block_size: usize) -> Quant {
        Quant { bits, block_size, accuracy_level: 0, lm_head: true, vision: false }
    }

    /// Dequantizes from the op's description alone (nibble order, zero point, scale layout): the
    /// independent reading the packer is checked against.
    fn dequantize(b: &[u8], scales: &[f32], n: usize, k: usize, bits: u8, block: usize) -> Vec<f32> {
        let kb = k.div_ceil(block);
        let blob = block * bits as usize / 8;
        let mut w = vec![0f32; n * k];
        for r in 0..n {
            for c in 0..k {
                let (blk, i) = (c / block, c % block);
                let bytes = &b[(r * kb + blk) * blob..];
                let stored = if bits == 4 {
                    let byte = bytes[i / 2];
                    if i % 2 == 0 {
                        byte & 0x0f
                    } else {
                        byte >> 4
                    }
                } else {
                    bytes[i]
                };
                let zero = 1i32 << (bits - 1);
                w[r * k + c] = (stored as i32 - zero) as f32 * scales[r * kb + blk];
            }
        }
        w
    }

    #[test]
    fn packing_round_trips_within_half_a_step() {
        // K = 80 is not a multiple of the block: the last block is padded.
        let (n, k) = (5, 80);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 101) as f32 - 50.0) / 37.0).collect();
        for (bits, block) in [(4, 16), (4, 32), (8, 32), (8, 64)] {
            let qq = q(bits, block);
            let b = qq.pack(&w, n, k);
            let s = qq.scales(&w, n, k);
            assert_eq!(b.len(), n * k.div_ceil(block) * block * bits as usize / 8);
            assert_eq!(s.len(), n * k.div_ceil(block));
            let d = dequantize(&b, &s, n, k, bits, block);
            for (i, (x, y)) in w.iter().zip(&d).enumerate() {
                let step = s[(i / k) * k.div_ceil(block) + (i % k) / block];
                assert!((x - y).abs() <= step / 2.0 + 1e-6, "int{bits}/{block} [{i}]: {x} vs {y} (step {step})");
            }
            // The block's largest magnitude is stored exactly (scale = absmax / qmax).
            let absmax = w[..block.min(k)].iter().fold(0f32, |m, x| m.max(x.abs()));
            let dmax = d[..block.min(k)].iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!((absmax - dmax).abs() < 1e-5, "int{bits}: {absmax} vs {dmax}");
        }
    }

    #[test]
    fn first_value_in_the_low_nibble() {
        let qq = q(4, 16);
        // One row: 7·s, −7·s, then zeros: stored 15, 1, then the zero point 8.
        let mut w = vec![0f32; 16];
        w[0] = 7.0;
        w[1] = -7.0;
        let b = qq.pack(&w, 1, 16);
        assert_eq!(b[0], 0x1f);
        assert_eq!(b[1], 0x88);
        assert_eq!(qq.scales(&w, 1, 16), vec![1.0]);
    }

    #[test]
    fn settings_are_checked() {
        assert!(q(4, 32).validate().is_ok());
        assert!(q(3, 32).validate().unwrap_err().contains("4 or 8"));
        assert!(q(4, 24).validate().unwrap_err().contains("power of two"));
        assert!(q(8, 8).validate().is_err());
        assert!(!Quant { lm_head: false, ..q(4, 32) }.applies("lm_head.weight"));
        assert!(Quant { lm_head: false, ..q(4, 32) }.applies("model.layers.0.mlp.fc1.weight"));
    }
}
