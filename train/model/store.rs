//! The weights of a draft head and their access, shared by every head kind (`model::arch`):
//! the trainable tensors in a `tch::nn::VarStore` under the reference's state-dict names (so an
//! export is a plain rename-free write), the frozen teacher tensors a head reads (lm_head, the
//! token table, the final norm), the draft's RoPE and LLaMA shape, and the compute kind.
//!
//! Trainable tensors are f32 master weights. Training under bf16 is autocast's policy
//! (`set_compute_kind`): weight matrices are cast to bf16 on use and every matrix product runs
//! in bf16, while the residual stream, norms (with their f32 weights), biases' additions, the
//! gates and the loss stay f32. For inference the whole store can be cast with `to_kind`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use tch::{nn, Device, Kind, Tensor};

use crate::model::config::LlamaConfig;
use crate::model::head_config::HeadConfig;
use crate::model::layers::{linear, rms_norm, DecoderLayer, KvCache, Rope};
use crate::model::teacher::Teacher;

/// What a store is built from besides its trainable tensors: the frozen teacher tensors the
/// head's kind reads, and its own decoder-layer count.
pub struct FrozenParts {
    /// The teacher's lm_head weight [V,H] (no copy).
    pub lm_head: Tensor,
    /// The table tokens are embedded with (`HeadArch::token_table`).
    pub token_table: Tensor,
    /// The teacher's final RMSNorm weight (EAGLE-1 and Medusa read post-norm features).
    pub final_norm: Tensor,
    /// The draft's own LLaMA decoder layers.
    pub decoder_layers: i64,
}

pub struct HeadStore {
    cfg: HeadConfig,
    draft_llama: LlamaConfig,
    vs: nn::VarStore,
    /// Shallow clones of the store's variables by name (they share storage and autograd).
    vars: BTreeMap<String, Tensor>,
    lm_head: Tensor,
    token_table: Tensor,
    final_norm: Tensor,
    rope: Rope,
    compute_kind: Kind,
}

impl HeadStore {
    /// A store holding `tensors` (f32 copies on the teacher's device), in `names` order.
    pub fn new(
        teacher: &Teacher,
        cfg: HeadConfig,
        names: &[String],
        tensors: &BTreeMap<String, Tensor>,
        frozen: FrozenParts,
    ) -> Self {
        let device = teacher.device();
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        for name in names {
            let t = tensors[name].to_kind(Kind::Float).to_device(device);
            add_named_var(&root, name, &t);
        }
        let draft_llama = draft_llama_config(&cfg, &teacher.config, frozen.decoder_layers);
        let rope = Rope::new(&draft_llama, device);
        let vars = vs.variables().into_iter().collect();
        HeadStore {
            cfg,
            draft_llama,
            vs,
            vars,
            lm_head: frozen.lm_head,
            token_table: frozen.token_table,
            final_norm: frozen.final_norm,
            rope,
            compute_kind: Kind::Float,
        }
    }

    pub fn config(&self) -> &HeadConfig {
        &self.cfg
    }
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
    pub fn device(&self) -> Device {
        self.vs.device()
    }
    pub fn compute_kind(&self) -> Kind {
        self.compute_kind
    }

    /// Casts the trainable weights themselves (inference: e.g. to the teacher's f16/bf16).
    pub fn to_kind(&mut self, kind: Kind) {
        self.vs.set_kind(kind);
        self.compute_kind = kind;
        self.vars = self.vs.variables().into_iter().collect();
    }

    /// Keeps the master weights as they are but runs the matrix products in `kind` (weight
    /// matrices cast on use, differentiable), the stream staying in the master kind: autocast's
    /// policy by hand, since tch's `autocast` offers only f16.
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.compute_kind = kind;
    }

    /// The dtype of the residual stream, norms and outputs: the master weights' (f32 in
    /// training, the cast kind after `to_kind`).
    pub fn stream_kind(&self) -> Kind {
        self.vars
            .values()
            .next()
            .map_or(self.compute_kind, |t| t.kind())
    }

    /// A trainable tensor by reference name: weight matrices cast to the compute kind (they
    /// enter matrix products), vectors (norm weights, biases) as the master copy.
    pub fn w(&self, name: &str) -> Result<Tensor> {
        let var = self
            .vars
            .get(name)
            .with_context(|| format!("draft head has no tensor {name}"))?;
        Ok(if var.kind() == self.compute_kind || var.dim() < 2 {
            var.shallow_clone()
        } else {
            var.to_kind(self.compute_kind)
        })
    }

    /// `w` for the names a kind's `trainable_shapes` lists, all created by `new`: absence is a
    /// bug in that kind, not a user error.
    pub fn wu(&self, name: &str) -> Tensor {
        self.w(name).unwrap_or_else(|e| panic!("draft head: {e}"))
    }

    /// The trainable tensors by reference name (shallow clones of the variables).
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    /// Token embeddings: rows of the frozen token table, in the stream's kind.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        let flat = ids.reshape([-1]);
        let mut shape = ids.size();
        shape.push(self.cfg.hidden_size);
        self.token_table
            .index_select(0, &flat)
            .reshape(shape.as_slice())
            .to_kind(self.stream_kind())
    }

    /// RMSNorm with the trainable weight `name`.
    pub fn norm(&self, name: &str, x: &Tensor) -> Tensor {
        rms_norm(x, &self.wu(name), self.cfg.rms_norm_eps)
    }

    /// The teacher's post-norm features h = final_norm(u), in the stream's kind.
    pub fn post_norm(&self, u: &Tensor) -> Tensor {
        let u = u.to_kind(self.stream_kind());
        rms_norm(
            &u,
            &self.final_norm.to_kind(u.kind()),
            self.cfg.rms_norm_eps,
        )
    }

    /// Logits through the frozen teacher lm_head, in the lm_head's kind.
    pub fn frozen_logits(&self, o: &Tensor) -> Tensor {
        linear(&o.to_kind(self.lm_head.kind()), &self.lm_head, None)
    }

    /// The frozen lm_head weight [V,H] (shared with the teacher).
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    /// The draft's rotary embedding.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The draft's own decoder layers `{prefix}.{l}.*` (l < the store's layer count), rebuilt
    /// per call from the (possibly cast) trainable weights so autograd reaches the master
    /// variables. `input_norm` false: layers without an input RMSNorm (EAGLE-1's layer 0).
    pub fn decoder_layers(&self, prefix: &str, input_norm: bool) -> Vec<DecoderLayer> {
        (0..self.draft_llama.num_hidden_layers)
            .map(|l| {
                let get = |rel: &str| self.w(&format!("{prefix}.{l}.{rel}"));
                DecoderLayer::from_weights_with(&self.draft_llama, &get, input_norm)
                    .unwrap_or_else(|e| panic!("draft layer {l}: {e}"))
            })
            .collect()
    }

    /// An empty draft KV cache for `batch` rows (the draft's layers, in the stream's kind).
    pub fn new_cache(&self, batch: i64) -> KvCache {
        KvCache::new(&self.draft_llama, batch, self.device(), self.stream_kind())
    }

    /// Positions 0..T for every row of a [B,T] batch.
    pub fn positions_like(&self, ids: &Tensor) -> Tensor {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        Tensor::arange(t, (Kind::Int64, self.device()))
            .unsqueeze(0)
            .expand([b, t], true)
    }
}

/// The teacher's LlamaConfig reshaped for the draft's own layers: their count, and the draft's
/// RoPE base without scaling (G2: the reference's plain LlamaRotaryEmbedding has none).
fn draft_llama_config(cfg: &HeadConfig, teacher: &LlamaConfig, layers: i64) -> LlamaConfig {
    let mut llama = teacher.clone();
    llama.num_hidden_layers = layers;
    llama.rope_theta = cfg.options.draft_rope_theta;
    llama.rope_scaling = None;
    llama
}

/// Adds `tensor` to the store under a dotted reference name (tch paths cannot contain '.').
fn add_named_var(root: &nn::Path, name: &str, tensor: &Tensor) {
    let mut parts: Vec<&str> = name.split('.').collect();
    let leaf = parts.pop().unwrap_or(name);
    let mut path = root.clone();
    for part in parts {
        path = path.sub(part);
    }
    let _variable = path.var_copy(leaf, tensor);
}

/// One LLaMA decoder layer's tensors under `prefix` (`input_norm` false: no input_layernorm).
pub fn decoder_layer_shapes(
    cfg: &HeadConfig,
    prefix: &str,
    input_norm: bool,
) -> Vec<(String, Vec<i64>)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q_out = cfg.num_attention_heads * cfg.head_dim;
    let kv_out = cfg.num_key_value_heads * cfg.head_dim;
    let p = prefix;
    let mut out = vec![
        (format!("{p}.self_attn.q_proj.weight"), vec![q_out, h]),
        (format!("{p}.self_attn.k_proj.weight"), vec![kv_out, h]),
        (format!("{p}.self_attn.v_proj.weight"), vec![kv_out, h]),
        (format!("{p}.self_attn.o_proj.weight"), vec![h, q_out]),
        (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
        (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
        (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
    ];
    if input_norm {
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
    }
    out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    out
}

/// torch's `nn.Linear` default init for a tensor with `fan_in` inputs, U(-1/sqrt(fan_in),
/// 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5) for the weight gives the same bound),
/// drawn on the CPU so a seed gives one head on every device.
pub fn torch_linear_default(shape: &[i64], fan_in: i64) -> Tensor {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Tensor::rand(shape, (Kind::Float, Device::Cpu)) * (2.0 * bound) - bound
}
