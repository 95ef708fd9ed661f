//! LLaMA building blocks shared by the teacher and the draft head's Augmenting Block: RMSNorm,
//! RoPE, the KV cache and the decoder layer (attention with explicit positions and masks).

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

use crate::model::config::{LlamaConfig, RopeScaling};

/// RMSNorm computed in f32 and cast back, as HF's LlamaRMSNorm does (f64 stays f64, so
/// finite-difference gradient checks of the draft head are not drowned in f32 rounding).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let compute = if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let x32 = x.to_kind(compute);
    let variance = x32.pow_tensor_scalar(2).mean_dim(-1, true, compute);
    let normed = (x32 * (variance + eps).rsqrt()).to_kind(kind);
    normed * weight
}

/// `x · wᵀ + b` with the product in the weight's dtype and the result back in `x`'s: autocast's
/// rule (only matrix products in bf16, the stream around them in f32) when a bf16 weight meets
/// an f32 stream, and a plain `linear` when the dtypes agree (the teacher, inference).
pub fn linear_cast(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let kind = x.kind();
    if kind == w.kind() && b.is_none_or(|b| b.kind() == kind) {
        return linear(x, w, b);
    }
    let b = b.map(|b| b.to_kind(w.kind()));
    linear(&x.to_kind(w.kind()), w, b.as_ref()).to_kind(kind)
}

/// Rows at most this many take `linear`'s transposed route.
const FEW_ROWS: i64 = 6;

/// x [.., K] · wᵀ (+ b), w [N,K]: every linear layer and vocabulary projection.
///
/// Decoding runs a handful of rows at a time (one plain step, a tree's n tokens, a depth's
/// expanded nodes), and for those, on the CPU in f32, libtorch's x·wᵀ is slow: on the 2-core
/// machine this was measured on, the SmolLM2 lm_head (49,152 x 576) took 6.9 ms for 1 row and
/// 14-21 ms for 2-3 rows, against 2.6-6 ms for the same product computed as (w·xᵀ)ᵀ, which
/// takes a faster kernel; a model of SmolLM2's 30 layers ran a 1-token step in 19-28 ms this way
/// against 33-34 ms, and 2-4 tokens in 20-36 ms against 48-65 ms. A single row is duplicated to
/// take that kernel too. From about 8 rows on (with one thread) the plain product wins again,
/// bf16 and CUDA gain nothing, and training (weights that need gradients) keeps the plain
/// product as well. Both routes compute the same K-term sums in other orders (round-off).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let k = *x.size().last().unwrap_or(&0);
    let rows = if k > 0 { x.numel() as i64 / k } else { 0 };
    let transposed = x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && w.kind() == Kind::Float
        && (1..=FEW_ROWS).contains(&rows)
        && !x.requires_grad()
        && !w.requires_grad();
    if !transposed {
        return x.linear(w, b);
    }
    let flat = x.reshape([rows, k]);
    let cols = if rows == 1 {
        Tensor::cat(&[&flat, &flat], 0)
    } else {
        flat
    };
    let mut shape = x.size();
    *shape.last_mut().unwrap() = w.size()[0];
    let out = w
        .matmul(&cols.tr())
        .tr()
        .narrow(0, 0, rows)
        .contiguous()
        .view(shape.as_slice());
    match b {
        Some(b) => out + b,
        None => out,
    }
}

/// Rotary position embedding in HF's half-split layout.
pub struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    pub fn new(cfg: &LlamaConfig, device: Device) -> Self {
        let dim = cfg.head_dim;
        let mut inv_freq: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / dim as f64))
            .collect();
        if let Some(scaling) = cfg
            .rope_scaling
            .as_ref()
            .filter(|s| s.rope_type == "llama3")
        {
            inv_freq = llama3_scaled(&inv_freq, scaling);
        }
        let inv_freq: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
        Self {
            inv_freq: Tensor::from_slice(&inv_freq).to_device(device),
        }
    }

    /// cos and sin of the angles for `positions` [B,S], shaped [B,1,S,D] for broadcasting over heads.
    pub fn cos_sin(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq;
        let angles = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (angles.cos(), angles.sin())
    }
}

/// RoPE applied to x [B,heads,S,D] (HF's half-split layout).
pub(crate) fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    let rotated = Tensor::cat(&[&(-x2), &x1], -1);
    let kind = x.kind();
    // f32 at least (as HF); f64 stays f64 for the draft head's finite-difference gradient check.
    let compute = if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    (x.to_kind(compute) * cos + rotated.to_kind(compute) * sin).to_kind(kind)
}

/// LLaMA 3.1's wavelength-dependent frequency scaling.
fn llama3_scaled(inv_freq: &[f64], s: &RopeScaling) -> Vec<f64> {
    let old_len = s.original_max_position_embeddings as f64;
    let low_wavelen = old_len / s.low_freq_factor;
    let high_wavelen = old_len / s.high_freq_factor;
    inv_freq
        .iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth = (old_len / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

/// Per-layer key/value cache, preallocated and grown on demand.
///
/// All layers share one committed length: layers write their new rows at `len()`, and the length
/// moves on (`advance`) once every layer has written.
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: i64,
}

impl KvCache {
    pub fn new(cfg: &LlamaConfig, batch: i64, device: Device, kind: Kind) -> Self {
        let capacity = 64;
        let shape = [batch, cfg.num_key_value_heads, capacity, cfg.head_dim];
        let alloc = || Tensor::zeros(shape, (kind, device));
        Self {
            keys: (0..cfg.num_hidden_layers).map(|_| alloc()).collect(),
            values: (0..cfg.num_hidden_layers).map(|_| alloc()).collect(),
            len: 0,
        }
    }

    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn truncate(&mut self, len: i64) {
        self.len = self.len.min(len.max(0));
    }

    /// Move the committed length on by `n` rows, after every layer has appended them.
    pub fn advance(&mut self, n: i64) {
        self.len += n;
    }

    /// Keep rows [0, start) and move the rows at absolute positions `select` (each >= start) to
    /// start..start+n: compacts the cache to the accepted path of a verified tree.
    pub fn compact(&mut self, start: i64, select: &Tensor) {
        let n = select.size()[0];
        let select = select.to_device(self.keys[0].device());
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let kept = t.index_select(2, &select);
            t.narrow(2, start, n).copy_(&kept);
        }
        self.len = start + n;
    }

    /// Write `k`,`v` [B,kv,S,D] for `layer` at the committed length and return the full
    /// keys/values [B,kv,len+S,D] the new rows attend over.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let s = k.size()[2];
        let needed = self.len + s;
        if needed > self.keys[layer].size()[2] {
            self.grow(needed);
        }
        self.keys[layer].narrow(2, self.len, s).copy_(k);
        self.values[layer].narrow(2, self.len, s).copy_(v);
        (
            self.keys[layer].narrow(2, 0, needed),
            self.values[layer].narrow(2, 0, needed),
        )
    }

    fn grow(&mut self, needed: i64) {
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let mut shape = t.size();
            let capacity = (shape[2] * 2).max(needed);
            shape[2] = capacity;
            let bigger = Tensor::zeros(&shape[..], (t.kind(), t.device()));
            bigger
                .narrow(2, 0, self.len)
                .copy_(&t.narrow(2, 0, self.len));
            *t = bigger;
        }
    }
}

/// Plain causal mask for `s` new tokens after `past` cached ones: bool [1,1,S,past+S].
pub fn causal_mask(past: i64, s: i64, device: Device) -> Tensor {
    let rows = Tensor::arange(s, (Kind::Int64, device)).unsqueeze(1) + past;
    let cols = Tensor::arange(past + s, (Kind::Int64, device)).unsqueeze(0);
    cols.le_tensor(&rows).view([1, 1, s, past + s])
}

/// One pre-norm LLaMA decoder layer: RMSNorm, self-attention with RoPE, residual; RMSNorm,
/// SwiGLU MLP, residual.
pub struct DecoderLayer {
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
    /// None: the layer feeds its input to attention un-normalised (EAGLE-1's layer 0).
    input_layernorm: Option<Tensor>,
    post_attention_layernorm: Tensor,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    eps: f64,
}

impl DecoderLayer {
    /// `get` returns a tensor by its name relative to the layer ("self_attn.q_proj.weight", ...).
    /// Tensors are used as given, so shallow clones of trainable variables keep autograd working.
    pub fn from_weights(cfg: &LlamaConfig, get: &dyn Fn(&str) -> Result<Tensor>) -> Result<Self> {
        Self::from_weights_with(cfg, get, true)
    }

    /// As `from_weights`; with `input_norm` false the layer has no input RMSNorm (and `get` is
    /// not asked for one), as EAGLE-1's first draft layer.
    pub fn from_weights_with(
        cfg: &LlamaConfig,
        get: &dyn Fn(&str) -> Result<Tensor>,
        input_norm: bool,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let q_out = cfg.num_attention_heads * cfg.head_dim;
        let kv_out = cfg.num_key_value_heads * cfg.head_dim;
        let i = cfg.intermediate_size;
        let shaped = |name: &str, shape: &[i64]| -> Result<Tensor> {
            let t = get(name)?;
            ensure!(
                t.size() == shape,
                "tensor {name} has shape {:?}, the config expects {shape:?}",
                t.size()
            );
            Ok(t)
        };
        Ok(Self {
            q_proj: shaped("self_attn.q_proj.weight", &[q_out, h])?,
            k_proj: shaped("self_attn.k_proj.weight", &[kv_out, h])?,
            v_proj: shaped("self_attn.v_proj.weight", &[kv_out, h])?,
            o_proj: shaped("self_attn.o_proj.weight", &[h, q_out])?,
            gate_proj: shaped("mlp.gate_proj.weight", &[i, h])?,
            up_proj: shaped("mlp.up_proj.weight", &[i, h])?,
            down_proj: shaped("mlp.down_proj.weight", &[h, i])?,
            input_layernorm: match input_norm {
                true => Some(shaped("input_layernorm.weight", &[h])?),
                false => None,
            },
            post_attention_layernorm: shaped("post_attention_layernorm.weight", &[h])?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps,
        })
    }

    /// `x` [B,S,H]; `angles` = `rope.cos_sin(positions)` for the new rows (computed once and shared
    /// by all layers); `mask` bool [B|1,1,S,past+S] (None = causal). Writes this layer's new K/V
    /// into `cache` at its committed length (the caller advances it).
    pub fn forward(
        &self,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        layer_idx: usize,
    ) -> Tensor {
        let normed = match &self.input_layernorm {
            Some(w) => rms_norm(x, w, self.eps),
            None => x.shallow_clone(),
        };
        let attn = self.attention(&normed, cos, sin, mask, cache, layer_idx);
        let x = x + attn;
        let normed = rms_norm(&x, &self.post_attention_layernorm, self.eps);
        let gate = linear_cast(&normed, &self.gate_proj, None).silu();
        let up = linear_cast(&normed, &self.up_proj, None);
        x + linear_cast(&(gate * up), &self.down_proj, None)
    }

    fn attention(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        layer_idx: usize,
    ) -> Tensor {
        let (b, s) = (x.size()[0], x.size()[1]);
        let heads = |w: &Tensor, n: i64| {
            linear_cast(x, w, None)
                .view([b, s, n, self.head_dim])
                .transpose(1, 2)
        };
        let q = rotate(&heads(&self.q_proj, self.num_heads), cos, sin);
        let k = rotate(&heads(&self.k_proj, self.num_kv_heads), cos, sin);
        let v = heads(&self.v_proj, self.num_kv_heads);
        let past = cache.as_ref().map_or(0, |c| c.len());
        let (k, v) = match cache {
            Some(cache) => cache.append(layer_idx, &k, &v),
            None => (k, v),
        };
        let groups = self.num_heads / self.num_kv_heads;
        let (k, v) = (repeat_kv(&k, groups), repeat_kv(&v, groups));
        // A single new token may attend to everything cached; a block with no prefix is plainly
        // causal; a block after a prefix needs the offset causal mask.
        let offset_causal;
        let (mask, is_causal) = match mask {
            Some(m) => (Some(m), false),
            None if s == 1 => (None, false),
            None if past == 0 => (None, true),
            None => {
                offset_causal = causal_mask(past, s, x.device());
                (Some(&offset_causal), false)
            }
        };
        // Attention is a matrix product too: in the weights' dtype, as autocast runs it.
        let matmul = self.q_proj.kind();
        let out = Tensor::scaled_dot_product_attention(
            &q.to_kind(matmul),
            &k.to_kind(matmul),
            &v.to_kind(matmul),
            mask,
            0.0,
            is_causal,
            None,
            false,
        )
        .to_kind(x.kind());
        let out = out
            .transpose(1, 2)
            .reshape([b, s, self.num_heads * self.head_dim]);
        linear_cast(&out, &self.o_proj, None)
    }
}

/// Expand grouped K/V heads [B,kv,L,D] to the query heads [B,kv*groups,L,D].
pub(crate) fn repeat_kv(x: &Tensor, groups: i64) -> Tensor {
    if groups == 1 {
        return x.shallow_clone();
    }
    let (b, kv, l, d) = x.size4().expect("K/V are 4-D");
    x.unsqueeze(2)
        .expand([b, kv, groups, l, d], false)
        .reshape([b, kv * groups, l, d])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transposed route of `linear` gives x·wᵀ + b, shape included, for every row count it
    /// takes (1 is duplicated) and one it does not. Each entry is an H-term sum computed in two
    /// orders, so they differ by at most 2·H·u·Σ_h |x_h·w_h| (u = 2^-24, f32; the bias is added
    /// once on both sides).
    #[test]
    fn few_row_linear_is_the_plain_product() {
        let _rng = crate::rng::hold(17);
        let (v, h) = (300i64, 48i64);
        let w = Tensor::randn([v, h], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([v], (Kind::Float, Device::Cpu));
        for rows in [1i64, 2, 3, 6, 7, 9] {
            let x = Tensor::randn([1, rows, h], (Kind::Float, Device::Cpu));
            let got = linear(&x, &w, Some(&b));
            let want = x.matmul(&w.tr()) + &b;
            assert_eq!(got.size(), vec![1, rows, v]);
            let size = x.abs().matmul(&w.abs().tr());
            let excess = ((&got - &want).abs() - size * (2.0 * h as f64 / 16_777_216.0))
                .max()
                .double_value(&[]);
            assert!(excess <= 0.0, "{rows} rows: {excess}");
        }
    }
}
