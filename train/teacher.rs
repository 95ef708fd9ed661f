//! The frozen teacher: a LLaMA-family decoder (LLaMA 1/2/3, Vicuna, Mistral-style GQA, SmolLM2)
//! loaded from a Hugging Face model directory.
//!
//! Besides logits, the forward pass returns the last layer's hidden state *before* the final
//! RMSNorm, because that pre-norm state is the Clover-2 draft input (spec G3). Attention takes
//! explicit position ids and an optional boolean mask over the KV-cached prefix plus the new
//! tokens, which is what tree verification needs (spec §4.5, G16).
//!
//! The decoder layer, RoPE and RMSNorm here are also the building blocks of the draft head's
//! Augmenting Block, so there is one LLaMA implementation in the crate.

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// llama3-style frequency-dependent RoPE scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    #[serde(default = "default_original_max")]
    pub original_max_position_embeddings: i64,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn default_original_max() -> i64 {
    8192
}

/// The fields of an HF `config.json` that a LLaMA-family decoder needs.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub vocab_size: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: i64,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
}

/// `eos_token_id` is an int in most configs and a list in LLaMA3's.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(i64),
    Many(Vec<i64>),
}

#[derive(Deserialize)]
struct RawConfig {
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    vocab_size: i64,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RopeScaling>,
    /// transformers 5 writes `rope_theta` and the scaling fields together under this key.
    rope_parameters: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<i64>,
    bos_token_id: Option<i64>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<i64>,
    model_type: Option<String>,
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let raw: RawConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a LLaMA-style config.json", path.display()))?;
        if let Some(t) = raw.model_type.as_deref() {
            ensure!(
                matches!(t, "llama" | "mistral" | "qwen2" | "smollm" | "smollm2"),
                "{}: model_type {t:?} is not a LLaMA-family decoder",
                path.display()
            );
        }
        ensure!(
            raw.num_attention_heads > 0 && raw.hidden_size % raw.num_attention_heads == 0,
            "{}: hidden_size {} is not divisible by num_attention_heads {}",
            path.display(),
            raw.hidden_size,
            raw.num_attention_heads
        );
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        ensure!(
            raw.num_attention_heads % num_key_value_heads == 0,
            "{}: num_attention_heads {} is not a multiple of num_key_value_heads {num_key_value_heads}",
            path.display(),
            raw.num_attention_heads
        );
        let (rope_theta, rope_scaling) = rope_settings(&raw, path)?;
        let eos_token_ids = match raw.eos_token_id {
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
            None => vec![],
        };
        Ok(Self {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads),
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            pad_token_id: raw.pad_token_id,
        })
    }
}

/// RoPE base and scaling from either the transformers 4 keys (`rope_theta`, `rope_scaling`) or
/// the transformers 5 `rope_parameters` object.
fn rope_settings(raw: &RawConfig, path: &Path) -> Result<(f64, Option<RopeScaling>)> {
    let mut theta = raw.rope_theta;
    let mut scaling = raw.rope_scaling.clone();
    if let Some(params) = &raw.rope_parameters {
        theta = theta.or(params.get("rope_theta").and_then(|v| v.as_f64()));
        if scaling.is_none() && params.get("rope_type").is_some() {
            scaling = Some(serde_json::from_value(params.clone()).with_context(|| {
                format!(
                    "{}: rope_parameters is not a rope scaling object",
                    path.display()
                )
            })?);
        }
    }
    let scaling = scaling.filter(|s| s.rope_type != "default");
    if let Some(s) = &scaling {
        ensure!(
            s.rope_type == "llama3",
            "{}: rope scaling type {:?} is not supported (only llama3)",
            path.display(),
            s.rope_type
        );
    }
    Ok((theta.unwrap_or(10000.0), scaling))
}

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

fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
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
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
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
    input_layernorm: Tensor,
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
            input_layernorm: shaped("input_layernorm.weight", &[h])?,
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
        let normed = rms_norm(x, &self.input_layernorm, self.eps);
        let attn = self.attention(&normed, cos, sin, mask, cache, layer_idx);
        let x = x + attn;
        let normed = rms_norm(&x, &self.post_attention_layernorm, self.eps);
        let gate = normed.linear::<Tensor>(&self.gate_proj, None).silu();
        let up = normed.linear::<Tensor>(&self.up_proj, None);
        x + (gate * up).linear::<Tensor>(&self.down_proj, None)
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
            x.linear::<Tensor>(w, None)
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
        let out =
            Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, is_causal, None, false);
        out.transpose(1, 2)
            .reshape([b, s, self.num_heads * self.head_dim])
            .linear::<Tensor>(&self.o_proj, None)
    }
}

/// Expand grouped K/V heads [B,kv,L,D] to the query heads [B,kv*groups,L,D].
fn repeat_kv(x: &Tensor, groups: i64) -> Tensor {
    if groups == 1 {
        return x.shallow_clone();
    }
    let (b, kv, l, d) = x.size4().expect("K/V are 4-D");
    x.unsqueeze(2)
        .expand([b, kv, groups, l, d], false)
        .reshape([b, kv * groups, l, d])
}

/// The frozen teacher model.
pub struct Teacher {
    pub config: LlamaConfig,
    pub dir: PathBuf,
    weights: HashMap<String, Tensor>,
    layers: Vec<DecoderLayer>,
    rope: Rope,
    device: Device,
    kind: Kind,
}

impl Teacher {
    /// Load an HF LLaMA-family directory: config.json plus model.safetensors, or the shards
    /// listed in model.safetensors.index.json.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        ensure!(
            dir.is_dir(),
            "model directory {} does not exist",
            dir.display()
        );
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let mut weights = HashMap::new();
        for file in weight_files(dir)? {
            let tensors = Tensor::read_safetensors(&file)
                .with_context(|| format!("cannot read weights {}", file.display()))?;
            for (name, t) in tensors {
                let t = if t.is_floating_point() {
                    t.to_device(device).to_kind(kind)
                } else {
                    t.to_device(device)
                };
                weights.insert(name, t);
            }
        }
        if !weights.contains_key("lm_head.weight") {
            ensure!(
                config.tie_word_embeddings,
                "{}: lm_head.weight is missing and tie_word_embeddings is false",
                dir.display()
            );
            let embed = weights
                .get("model.embed_tokens.weight")
                .with_context(|| {
                    format!("{}: model.embed_tokens.weight is missing", dir.display())
                })?
                .shallow_clone();
            weights.insert("lm_head.weight".into(), embed);
        }
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let get = |name: &str| {
                    lookup(&weights, dir, &format!("model.layers.{i}.{name}"))
                        .map(Tensor::shallow_clone)
                };
                DecoderLayer::from_weights(&config, &get)
            })
            .collect::<Result<Vec<_>>>()?;
        let h = config.hidden_size;
        for (name, shape) in [
            ("model.embed_tokens.weight", [config.vocab_size, h]),
            ("lm_head.weight", [config.vocab_size, h]),
        ] {
            let t = lookup(&weights, dir, name)?;
            ensure!(
                t.size() == shape,
                "{}: {name} has shape {:?}, config.json implies {shape:?}",
                dir.display(),
                t.size()
            );
        }
        lookup(&weights, dir, "model.norm.weight")?;
        Ok(Self {
            rope: Rope::new(&config, device),
            config,
            dir: dir.to_path_buf(),
            weights,
            layers,
            device,
            kind,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self, batch: i64) -> KvCache {
        KvCache::new(&self.config, batch, self.device, self.kind)
    }

    /// ids [B,S]; positions [B,S]; mask None (causal) or bool [B|1,1,S,cache_len+S]. Appends the
    /// new K/V rows to `cache` and returns the last layer's pre-norm hidden state [B,S,H].
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let mut x = Tensor::embedding(
            &self.weights["model.embed_tokens.weight"],
            ids,
            -1,
            false,
            false,
        );
        let angles = self.rope.cos_sin(positions);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &angles, mask, cache.as_deref_mut(), i);
        }
        if let Some(cache) = cache {
            cache.advance(ids.size()[1]);
        }
        x
    }

    pub fn final_norm(&self, u: &Tensor) -> Tensor {
        rms_norm(
            u,
            &self.weights["model.norm.weight"],
            self.config.rms_norm_eps,
        )
    }

    pub fn lm_head(&self, h: &Tensor) -> Tensor {
        h.linear::<Tensor>(self.lm_head_weight(), None)
    }

    pub fn logits(&self, u: &Tensor) -> Tensor {
        self.lm_head(&self.final_norm(u))
    }

    pub fn lm_head_weight(&self) -> &Tensor {
        &self.weights["lm_head.weight"]
    }

    pub fn weight(&self, hf_name: &str) -> Result<&Tensor> {
        lookup(&self.weights, &self.dir, hf_name)
    }
}

fn lookup<'a>(weights: &'a HashMap<String, Tensor>, dir: &Path, name: &str) -> Result<&'a Tensor> {
    weights
        .get(name)
        .with_context(|| format!("{}: weight {name} is missing", dir.display()))
}

/// The safetensors files of a model dir: the shards named by model.safetensors.index.json, or
/// the single model.safetensors. Missing shards are reported all at once.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = json["weight_map"]
            .as_object()
            .with_context(|| format!("{} has no weight_map", index.display()))?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        shards.sort();
        shards.dedup();
        let missing: Vec<&String> = shards.iter().filter(|s| !dir.join(s).exists()).collect();
        if !missing.is_empty() {
            bail!(
                "{}: {} of {} weight shards listed in model.safetensors.index.json are missing: {}",
                dir.display(),
                missing.len(),
                shards.len(),
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        return Ok(shards.iter().map(|s| dir.join(s)).collect());
    }
    let single = dir.join("model.safetensors");
    ensure!(
        single.exists(),
        "{}: neither model.safetensors nor model.safetensors.index.json is present",
        dir.display()
    );
    Ok(vec![single])
}

/// Where and in what precision a command runs the teacher (and the draft head with it).
#[derive(clap::Args, Debug, Clone)]
pub struct RunOn {
    /// cpu, cuda, cuda:N or auto (CUDA when available).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, f16 or bf16 (default: f32 on the CPU, where 16-bit matmuls are slow; bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
}

impl RunOn {
    pub fn cpu() -> Self {
        Self {
            device: "cpu".into(),
            dtype: None,
        }
    }

    pub fn resolve(&self) -> Result<(Device, Kind)> {
        let device = parse_device(&self.device)?;
        let kind = match self.dtype.as_deref() {
            Some(name) => parse_kind(name)?,
            None if device == Device::Cpu => Kind::Float,
            None => Kind::BFloat16,
        };
        Ok((device, kind))
    }
}

/// Parse a device name: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available).
pub fn parse_device(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "auto" => Device::cuda_if_available(),
        "cuda" => {
            ensure!(
                tch::Cuda::is_available(),
                "--device cuda asked for, but CUDA is not available"
            );
            Device::Cuda(0)
        }
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => {
                ensure!(
                    i < tch::Cuda::device_count() as usize,
                    "CUDA device {i} does not exist"
                );
                Device::Cuda(i)
            }
            _ => bail!("unknown device {other:?} (use cpu, cuda, cuda:N or auto)"),
        },
    })
}

/// Parse a dtype name: f32, f16, bf16.
pub fn parse_kind(name: &str) -> Result<Kind> {
    Ok(match name {
        "f32" | "float32" => Kind::Float,
        "f16" | "float16" | "fp16" => Kind::Half,
        "bf16" | "bfloat16" => Kind::BFloat16,
        other => bail!("unknown dtype {other:?} (use f32, f16 or bf16)"),
    })
}
