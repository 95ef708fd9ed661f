//! The frozen teacher: a LLaMA-family decoder (LLaMA 1/2/3, Vicuna, Mistral-style GQA, SmolLM2)
//! loaded from a Hugging Face model directory.
//!
//! Besides logits, the forward pass returns the last layer's hidden state *before* the final
//! RMSNorm, because that pre-norm state is the Clover-2 draft input (docs/clover2.md G3). Attention takes
//! explicit position ids and an optional boolean mask over the KV-cached prefix plus the new
//! tokens, which is what tree verification needs (docs/clover2.md §4.5, G16).
//!
//! The decoder layer, RoPE and RMSNorm here are also the building blocks of the draft head's
//! Augmenting Block, so there is one LLaMA implementation in the crate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::model::config::LlamaConfig;
use crate::model::layers::{rms_norm, DecoderLayer, KvCache, Rope};

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
            !dir.is_file(),
            "model directory {} is a file, not a directory",
            dir.display()
        );
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
        Self::from_weights(config, dir, weights, device, kind)
    }

    /// A teacher from its config and named weights (already on `device` in `kind`); `dir` names
    /// it in errors and is where checkpoints copy its config.json from.
    pub fn from_weights(
        config: LlamaConfig,
        dir: &Path,
        mut weights: HashMap<String, Tensor>,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
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
                    .with_context(|| format!("{}: model.layers.{i}", dir.display()))
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
        let norm = lookup(&weights, dir, "model.norm.weight")?;
        ensure!(
            norm.size() == [h],
            "{}: model.norm.weight has shape {:?}, config.json implies [{h}]",
            dir.display(),
            norm.size()
        );
        refuse_unused(&weights, &config, dir)?;
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

    /// `forward`, also returning the states a draft reads from inside the teacher (EAGLE-3):
    /// the input of each decoder layer named in `layers` (an id equal to the layer count is the
    /// last layer's pre-norm output u), concatenated in the order given, [B,S,len·H]. With no
    /// layers named that is u itself. Returns (u, those states).
    pub fn forward_tapped(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        layers: Option<&[i64]>,
    ) -> (Tensor, Tensor) {
        let Some(layers) = layers else {
            let u = self.forward(ids, positions, mask, cache);
            return (u.shallow_clone(), u);
        };
        let mut x = Tensor::embedding(
            &self.weights["model.embed_tokens.weight"],
            ids,
            -1,
            false,
            false,
        );
        let angles = self.rope.cos_sin(positions);
        let mut taps: Vec<(usize, Tensor)> = Vec::new();
        let mut tap = |i: usize, x: &Tensor| {
            taps.extend(
                (layers.iter().enumerate())
                    .filter(|(_, &l)| l == i as i64)
                    .map(|(at, _)| (at, x.shallow_clone())),
            )
        };
        for (i, layer) in self.layers.iter().enumerate() {
            tap(i, &x);
            x = layer.forward(&x, &angles, mask, cache.as_deref_mut(), i);
        }
        tap(self.layers.len(), &x);
        if let Some(cache) = cache {
            cache.advance(ids.size()[1]);
        }
        taps.sort_by_key(|t| t.0);
        let states: Vec<Tensor> = taps.into_iter().map(|t| t.1).collect();
        (x, Tensor::cat(&states, -1))
    }

    pub fn final_norm(&self, u: &Tensor) -> Tensor {
        rms_norm(
            u,
            &self.weights["model.norm.weight"],
            self.config.rms_norm_eps,
        )
    }

    pub fn lm_head(&self, h: &Tensor) -> Tensor {
        crate::model::layers::linear(h, self.lm_head_weight(), None)
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

    /// Refuses token ids the teacher has no embedding for (libtorch would abort on them): a
    /// tokenizer or prepared data from another model. The error names the first bad id, its
    /// position and the teacher; callers say whose ids they are.
    pub fn check_token_ids(&self, ids: &[i64]) -> Result<()> {
        let vocab = self.config.vocab_size;
        match ids.iter().position(|&t| !(0..vocab).contains(&t)) {
            None => Ok(()),
            Some(at) => bail!(
                "token id {} at position {at} is outside the vocabulary of the teacher {} \
                 ({vocab} ids): are the tokenizer or the data from another model?",
                ids[at],
                self.dir.display()
            ),
        }
    }
}

/// The names a teacher of `config` reads: its layers' tensors, the embeddings, the final norm,
/// the lm_head. `rotary_emb.inv_freq` buffers that old checkpoints carry are recomputed from the
/// config and count as read.
fn is_used(name: &str, config: &LlamaConfig) -> bool {
    const TOP: [&str; 3] = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ];
    if TOP.contains(&name) || name.ends_with(".rotary_emb.inv_freq") {
        return true;
    }
    const LAYER: [&str; 9] = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ];
    let Some((index, rest)) = name
        .strip_prefix("model.layers.")
        .and_then(|r| r.split_once('.'))
    else {
        return false;
    };
    index
        .parse::<i64>()
        .is_ok_and(|i| (0..config.num_hidden_layers).contains(&i))
        && LAYER.contains(&rest)
}

/// Weights the config does not use mean the config does not describe them (say, two layers
/// declared over thirty of weights): running would silently compute another model.
fn refuse_unused(
    weights: &HashMap<String, Tensor>,
    config: &LlamaConfig,
    dir: &Path,
) -> Result<()> {
    let mut unused: Vec<&str> = weights
        .keys()
        .map(String::as_str)
        .filter(|name| !is_used(name, config))
        .collect();
    unused.sort();
    ensure!(
        unused.is_empty(),
        "{}: {} weights are not used by config.json ({} layers): {}",
        dir.display(),
        unused.len(),
        config.num_hidden_layers,
        crate::checks::first_few(&unused)
    );
    Ok(())
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
