//! Dequantization of GGUF tensor types (F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K) to f32, as llama.cpp's
//! reference kernels do it.

use anyhow::{anyhow, ensure, Result};
use half::{bf16, f16};
use rayon::prelude::*;

/// A ggml tensor type id (`enum ggml_type`). Kept as the raw id so files with types we cannot
/// dequantize still open, and the error can name the type when such a tensor is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const BF16: GgmlType = GgmlType(30);

    pub fn name(self) -> String {
        let known = match self.0 {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            30 => "BF16",
            34 => "TQ1_0",
            35 => "TQ2_0",
            39 => "MXFP4",
            other => return format!("ggml type {other}"),
        };
        known.to_string()
    }

    /// (elements per block, bytes per block) for the types whose layout we know, so tensor
    /// extents can be checked against the file even for types we cannot dequantize.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        Some(match self.0 {
            0 => (1, 4),
            1 | 30 => (1, 2),
            2 => (32, 18),
            3 => (32, 20),
            6 => (32, 22),
            7 => (32, 24),
            8 => (32, 34),
            9 => (32, 36),
            10 => (256, 84),
            11 => (256, 110),
            12 => (256, 144),
            13 => (256, 176),
            14 => (256, 210),
            15 => (256, 292),
            24 => (1, 1),
            25 => (1, 2),
            26 => (1, 4),
            27 | 28 => (1, 8),
            _ => return None,
        })
    }

    pub fn can_dequantize(self) -> bool {
        [
            Self::F32,
            Self::F16,
            Self::BF16,
            Self::Q8_0,
            Self::Q4_0,
            Self::Q4_1,
            Self::Q4_K,
            Self::Q6_K,
        ]
        .contains(&self)
    }
}

/// Dequantizes `n` elements of type `ty` from `bytes` (exactly the tensor's data) to f32.
/// Runs in parallel over groups of blocks.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let (block_elems, block_bytes) = ty
        .block_layout()
        .filter(|_| ty.can_dequantize())
        .ok_or_else(|| anyhow!("cannot dequantize type {} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)", ty.name()))?;
    ensure!(
        n.is_multiple_of(block_elems),
        "{n} elements is not a whole number of {} blocks of {block_elems}",
        ty.name()
    );
    let expected = n / block_elems * block_bytes;
    ensure!(
        bytes.len() == expected,
        "{} bytes for {n} {} elements, expected {expected}",
        bytes.len(),
        ty.name()
    );
    let mut out = vec![0f32; n];
    match ty {
        GgmlType::F32 => for_each_block(bytes, &mut out, 4, 1, |b, o| {
            o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }),
        GgmlType::F16 => for_each_block(bytes, &mut out, 2, 1, |b, o| {
            o[0] = f16::from_le_bytes([b[0], b[1]]).to_f32()
        }),
        GgmlType::BF16 => for_each_block(bytes, &mut out, 2, 1, |b, o| {
            o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()
        }),
        GgmlType::Q8_0 => for_each_block(bytes, &mut out, block_bytes, block_elems, dequant_q8_0),
        GgmlType::Q4_0 => for_each_block(bytes, &mut out, block_bytes, block_elems, dequant_q4_0),
        GgmlType::Q4_1 => for_each_block(bytes, &mut out, block_bytes, block_elems, dequant_q4_1),
        GgmlType::Q4_K => for_each_block(bytes, &mut out, block_bytes, block_elems, dequant_q4_k),
        GgmlType::Q6_K => for_each_block(bytes, &mut out, block_bytes, block_elems, dequant_q6_k),
        _ => unreachable!("can_dequantize() lists exactly the types matched above"),
    }
    Ok(out)
}

/// Applies `f(block_bytes, block_out)` to every block; rayon tasks take many blocks each so
/// scalar types (block of one element) do not drown in scheduling overhead.
fn for_each_block<F>(bytes: &[u8], out: &mut [f32], block_bytes: usize, block_elems: usize, f: F)
where
    F: Fn(&[u8], &mut [f32]) + Sync,
{
    let blocks_per_task = (16384 / block_elems).max(1);
    out.par_chunks_mut(block_elems * blocks_per_task)
        .zip(bytes.par_chunks(block_bytes * blocks_per_task))
        .for_each(|(o, b)| {
            for (ob, bb) in o
                .chunks_exact_mut(block_elems)
                .zip(b.chunks_exact(block_bytes))
            {
                f(bb, ob);
            }
        });
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// block_q8_0 { f16 d; i8 qs[32]; }: x = d * q.
fn dequant_q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = d * f32::from(q as i8);
    }
}

/// block_q4_0 { f16 d; u8 qs[16]; }: low nibbles are elements 0..16, high nibbles 16..32;
/// x = d * (q - 8).
fn dequant_q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for (j, &q) in qs.iter().enumerate() {
        out[j] = d * f32::from((q & 0x0f) as i8 - 8);
        out[j + 16] = d * f32::from((q >> 4) as i8 - 8);
    }
}

/// block_q4_1 { f16 d; f16 m; u8 qs[16]; }: same nibble order as Q4_0; x = d * q + m
/// (an unfused multiply-add, like ggml's reference and the gguf Python package).
fn dequant_q4_1(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for (j, &q) in qs.iter().enumerate() {
        out[j] = d * f32::from(q & 0x0f) + m;
        out[j + 16] = d * f32::from(q >> 4) + m;
    }
}

/// Q4_K's 6-bit (scale, min) pair `j` of 8, packed in 12 bytes (ggml's get_scale_min_k4).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; } over 256 elements: 8 sub-blocks
/// of 32, each x = d*sc * q - dmin*m; each 32 bytes of qs hold two sub-blocks (low, high nibble).
fn dequant_q4_k(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (chunk, (q, o)) in qs
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        for l in 0..32 {
            o[l] = d1 * f32::from(q[l] & 0x0f) - m1;
            o[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; } over 256 elements: 6-bit quants
/// (4 low bits in ql, 2 high bits in qh) minus 32, times d * scale of their 16-element group.
fn dequant_q6_k(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let o = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            o[l] = d * f32::from(sc[is] as i8) * f32::from(q1);
            o[l + 32] = d * f32::from(sc[is + 2] as i8) * f32::from(q2);
            o[l + 64] = d * f32::from(sc[is + 4] as i8) * f32::from(q3);
            o[l + 96] = d * f32::from(sc[is + 6] as i8) * f32::from(q4);
        }
    }
}
