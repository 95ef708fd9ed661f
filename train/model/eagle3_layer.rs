//! EAGLE-3's one decoder layer (docs/heads.md §6.1): a LLaMA layer whose attention reads
//! [input_layernorm(embedding), hidden_norm(hidden)] (2H wide, so q/k/v are [., 2H]) while its
//! residual stream is the un-normalised hidden half (the reference's `norm_before_residual`
//! false). Its keys and values are handed over explicitly: decoding keeps them in a `KvCache`,
//! training-time test concatenates every step's, so autograd sees all of them (a cache written in
//! place would invalidate what the backward of the earlier steps saved).

use tch::Tensor;

use crate::model::layers::{causal_mask, linear_cast, repeat_kv, rms_norm, rotate};
use crate::model::store::HeadStore;

pub struct Eagle3Layer {
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
    input_layernorm: Tensor,
    hidden_norm: Tensor,
    post_attention_layernorm: Tensor,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    eps: f64,
}

/// One call's rows after the projections: queries, keys and values (RoPE applied) [B,heads,S,D]
/// and the residual (the hidden half) [B,S,H].
pub struct Projected {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    residual: Tensor,
}

impl Eagle3Layer {
    /// The layer `layers.0.*` of a store (rebuilt per call, so autograd reaches the variables).
    pub fn of(w: &HeadStore) -> Self {
        let get = |rel: &str| w.wu(&format!("layers.0.{rel}"));
        let cfg = w.config();
        Eagle3Layer {
            q_proj: get("self_attn.q_proj.weight"),
            k_proj: get("self_attn.k_proj.weight"),
            v_proj: get("self_attn.v_proj.weight"),
            o_proj: get("self_attn.o_proj.weight"),
            gate_proj: get("mlp.gate_proj.weight"),
            up_proj: get("mlp.up_proj.weight"),
            down_proj: get("mlp.down_proj.weight"),
            input_layernorm: get("input_layernorm.weight"),
            hidden_norm: get("hidden_norm.weight"),
            post_attention_layernorm: get("post_attention_layernorm.weight"),
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps,
        }
    }

    /// The projections of rows with token embeddings `emb` and hidden states `hidden` [B,S,H],
    /// at the RoPE `angles` of their positions.
    pub fn project(
        &self,
        emb: &Tensor,
        hidden: &Tensor,
        (cos, sin): &(Tensor, Tensor),
    ) -> Projected {
        let x = Tensor::cat(
            &[
                rms_norm(emb, &self.input_layernorm, self.eps),
                rms_norm(hidden, &self.hidden_norm, self.eps),
            ],
            -1,
        );
        let (b, s) = (x.size()[0], x.size()[1]);
        let heads = |w: &Tensor, n: i64| {
            linear_cast(&x, w, None)
                .view([b, s, n, self.head_dim])
                .transpose(1, 2)
        };
        Projected {
            q: rotate(&heads(&self.q_proj, self.num_heads), cos, sin),
            k: rotate(&heads(&self.k_proj, self.num_kv_heads), cos, sin),
            v: heads(&self.v_proj, self.num_kv_heads),
            residual: hidden.shallow_clone(),
        }
    }

    /// Attention of the projected rows over `keys`/`values` [B,kv,P,D] (earlier rows first, then
    /// the rows' own), then the residual and the MLP. `mask` bool [B|1,1,S,P]; None: causal
    /// with the rows' own keys last. Returns the layer's output [B,S,H].
    pub fn finish(
        &self,
        p: &Projected,
        keys: &Tensor,
        values: &Tensor,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let (b, s) = (p.q.size()[0], p.q.size()[2]);
        let past = keys.size()[2] - s;
        let groups = self.num_heads / self.num_kv_heads;
        let offset_causal;
        let (mask, is_causal) = match mask {
            Some(m) => (Some(m), false),
            None if s == 1 => (None, false),
            None if past == 0 => (None, true),
            None => {
                offset_causal = causal_mask(past, s, p.q.device());
                (Some(&offset_causal), false)
            }
        };
        let matmul = self.q_proj.kind();
        let out = Tensor::scaled_dot_product_attention(
            &p.q.to_kind(matmul),
            &repeat_kv(keys, groups).to_kind(matmul),
            &repeat_kv(values, groups).to_kind(matmul),
            mask,
            0.0,
            is_causal,
            None,
            false,
        )
        .to_kind(p.residual.kind())
        .transpose(1, 2)
        .reshape([b, s, self.num_heads * self.head_dim]);
        let x = &p.residual + linear_cast(&out, &self.o_proj, None);
        let normed = rms_norm(&x, &self.post_attention_layernorm, self.eps);
        let gate = linear_cast(&normed, &self.gate_proj, None).silu();
        let up = linear_cast(&normed, &self.up_proj, None);
        x + linear_cast(&(gate * up), &self.down_proj, None)
    }
}
