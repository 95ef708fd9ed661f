//! The Clover-2 draft head (docs/clover2.md §1): Attention-Decoder cells, the 2-layer Augmenting
//! Block, `clover_norm`, FC0 / the weight-tied regressive FC with `clover_head_norm`, scored by
//! the frozen teacher lm_head, tokens embedded with the lm_head-tied frozen table (G8).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};

use crate::model::arch::{HeadArch, LossDefaults, TokenRows};
use crate::model::head_config::{HeadConfig, HeadKind, HeadOptions};
use crate::model::layers::{linear_cast, rms_norm, KvCache};
use crate::model::store::{decoder_layer_shapes, HeadStore};
use crate::model::teacher::Teacher;

/// The Clover-2 architecture.
pub struct Clover2;

/// The two Attention-Decoder cells: depth 0's and the weight-tied one of depths >= 1.
const CELLS: [&str; 2] = ["clover_head_mlp_rnn", "clover_head_mlp_rnn2"];

impl HeadArch for Clover2 {
    fn kind(&self) -> HeadKind {
        HeadKind::Clover2
    }

    fn trainable_shapes(&self, cfg: &HeadConfig) -> Vec<(String, Vec<i64>)> {
        let h = cfg.hidden_size;
        let mut out: Vec<(String, Vec<i64>)> = Vec::new();
        for l in 0..cfg.options.num_layers {
            out.extend(decoder_layer_shapes(cfg, &format!("layers.{l}"), true));
        }
        out.push(("clover_norm.weight".into(), vec![h]));
        out.push(("clover_head_norm.weight".into(), vec![h]));
        out.push(("clover_head_mlp.weight".into(), vec![h, h]));
        out.push(("clover_head_mlp.bias".into(), vec![h]));
        out.push(("clover_head_mlp2.weight".into(), vec![h, 2 * h]));
        out.push(("clover_head_mlp2.bias".into(), vec![h]));
        for cell in CELLS {
            out.push((format!("{cell}.input_layernorm.weight"), vec![h]));
            for proj in ["q", "k", "v"] {
                out.push((format!("{cell}.{proj}.weight"), vec![h, h]));
                out.push((format!("{cell}.{proj}.bias"), vec![h]));
            }
        }
        out
    }

    fn decoder_layers(&self, opts: &HeadOptions) -> i64 {
        opts.num_layers
    }

    fn described_size(&self, opts: &HeadOptions) -> String {
        format!("with num_layers = {}", opts.num_layers)
    }

    fn init(&self, teacher: &Teacher, cfg: &HeadConfig) -> Result<BTreeMap<String, Tensor>> {
        reference_init(teacher, cfg)
    }

    fn depth0(
        &self,
        w: &HeadStore,
        u: &Tensor,
        rows: &TokenRows,
        mut cache: Option<&mut KvCache>,
    ) -> (Tensor, Tensor) {
        let u = u.to_kind(w.stream_kind());
        let mut z = cell(w, CELLS[0], &u, &w.embed(rows.next_ids));
        let angles = w.rope().cos_sin(rows.positions);
        for (l, layer) in w.decoder_layers("layers", true).iter().enumerate() {
            z = layer.forward(&z, &angles, rows.mask, cache.as_deref_mut(), l);
        }
        if let Some(c) = cache {
            c.advance(rows.next_ids.size()[1]);
        }
        let s0 = w.norm("clover_norm.weight", &z);
        let fc0 = linear_cast(
            &s0,
            &w.wu("clover_head_mlp.weight"),
            Some(&w.wu("clover_head_mlp.bias")),
        );
        (w.norm("clover_head_norm.weight", &fc0), s0)
    }

    /// The weight-tied regressive step (any depth): the carried state is the cell output, not
    /// the FC output (G7).
    fn step(
        &self,
        w: &HeadStore,
        _depth: i64,
        state: &Tensor,
        tokens: &Tensor,
    ) -> (Tensor, Tensor) {
        let state = state.to_kind(w.stream_kind());
        let emb = w.embed(tokens);
        // The regressive-connection ablation: depths >= 1 do not see the chosen token.
        let emb = match w.config().options.regressive_connection {
            true => emb,
            false => emb.zeros_like(),
        };
        let s = cell(w, CELLS[1], &state, &emb);
        let fc = linear_cast(
            &Tensor::cat(&[&s, &emb], -1),
            &w.wu("clover_head_mlp2.weight"),
            Some(&w.wu("clover_head_mlp2.bias")),
        );
        (w.norm("clover_head_norm.weight", &fc), s)
    }

    /// Depth i gets state[:, :T-i] and emb[:, i:] (§1.3, G5).
    fn depth_outputs(&self, w: &HeadStore, u: &Tensor, next_ids: &Tensor) -> Vec<Tensor> {
        let t = next_ids.size()[1];
        let positions = w.positions_like(next_ids);
        let rows = TokenRows {
            next_ids,
            positions: &positions,
            mask: None,
        };
        let (o0, mut state) = self.depth0(w, u, &rows, None);
        let mut outs = vec![o0];
        for i in 1..w.config().options.num_depths.min(t) {
            let tok = next_ids.narrow(1, i, t - i);
            let (o, s) = self.step(w, i, &state.narrow(1, 0, t - i), &tok);
            outs.push(o);
            state = s;
        }
        outs
    }

    fn loss_defaults(&self) -> LossDefaults {
        LossDefaults {
            regression: 10.0,
            distillation: 1.0,
            input_noise: 0.0,
        }
    }

    fn frozen_names(&self) -> &'static [&'static str] {
        &["lm_head.weight", "clover_embed_tokens.weight"]
    }

    fn export_config_keys(&self, _opts: &HeadOptions, _config: &mut Map<String, Value>) {}

    fn takes_draft_vocab(&self) -> bool {
        true
    }

    fn searches_trees(&self) -> bool {
        true
    }
}

/// One Attention-Decoder cell (docs/clover2.md §1.2) of the store's weights under `prefix`.
fn cell(w: &HeadStore, prefix: &str, x: &Tensor, y: &Tensor) -> Tensor {
    let p = |s: &str| w.wu(&format!("{prefix}.{s}"));
    let cfg = w.config();
    attention_decoder(
        x,
        y,
        &p("input_layernorm.weight"),
        (&p("q.weight"), &p("q.bias")),
        (&p("k.weight"), &p("k.bias")),
        (&p("v.weight"), &p("v.bias")),
        cfg.num_attention_heads,
        cfg.rms_norm_eps,
    )
}

/// One Attention-Decoder cell (docs/clover2.md §1.2): per-head cosine gate of q = W_q RMSNorm(x)
/// + b_q against k = W_k y + b_k, scaling v = W_v y + b_v, plus the residual. No softmax, no
/// output projection. q, k and v are (weight, bias) pairs.
pub fn attention_decoder(
    x: &Tensor,
    y: &Tensor,
    norm_w: &Tensor,
    q: (&Tensor, &Tensor),
    k: (&Tensor, &Tensor),
    v: (&Tensor, &Tensor),
    num_heads: i64,
    eps: f64,
) -> Tensor {
    let h = x.size().last().copied().unwrap_or(0);
    let d = h / num_heads;
    let mut split: Vec<i64> = x.size()[..x.dim() - 1].to_vec();
    split.extend([num_heads, d]);
    let qh = linear_cast(&rms_norm(x, norm_w, eps), q.0, Some(q.1)).reshape(split.as_slice());
    let kh = linear_cast(y, k.0, Some(k.1)).reshape(split.as_slice());
    let vh = linear_cast(y, v.0, Some(v.1)).reshape(split.as_slice());
    // torch.cosine_similarity with eps = rms_norm_eps, as the reference (G8).
    let gate = Tensor::cosine_similarity(&qh, &kh, -1, eps).unsqueeze(-1);
    x + (gate * vh).reshape(x.size().as_slice())
}

/// U[0, 0.01) noise as `nn.init.uniform_(t, b=0.01)` (a = 0: all positive), generated on the CPU so
/// the seeded init is the same on every device.
fn small_uniform(shape: &[i64]) -> Tensor {
    Tensor::rand(shape, (Kind::Float, Device::Cpu)) * 0.01
}

/// Identity plus U[0,0.01), the reference's init of the cell's q,k and of FC0.
fn eye_plus_uniform(h: i64) -> Tensor {
    Tensor::eye(h, (Kind::Float, Device::Cpu)) + small_uniform(&[h, h])
}

/// The reference's `part_eye_with_uniform` for FC1 [H, 2H]: U[0,0.01) with the identity added on
/// the first H input columns (the state half of concat[state, emb], G7).
fn part_eye_uniform(h: i64) -> Tensor {
    let w = small_uniform(&[h, 2 * h]);
    let eye = Tensor::eye(h, (Kind::Float, Device::Cpu));
    Tensor::cat(&[&w.narrow(1, 0, h) + eye, w.narrow(1, h, h)], 1)
}

fn zeros(h: i64) -> Tensor {
    Tensor::zeros([h], (Kind::Float, Device::Cpu))
}

/// The reference initialisation (§1.1) as named CPU f32 tensors. The global torch seed must be
/// set by the caller.
fn reference_init(teacher: &Teacher, cfg: &HeadConfig) -> Result<BTreeMap<String, Tensor>> {
    let h = cfg.hidden_size;
    let teacher_w = |name: &str| -> Result<Tensor> {
        Ok(teacher
            .weight(name)
            .with_context(|| format!("teacher weight {name} for the draft init"))?
            .to_kind(Kind::Float)
            .to_device(Device::Cpu))
    };
    let mut out = BTreeMap::new();
    let src = format!("model.layers.{}", cfg.options.init_from_layer);
    for (name, _) in Clover2.trainable_shapes(cfg) {
        if let Some(rest) = name.strip_prefix("layers.") {
            // "layers.{l}.<rel>": every Augmenting-Block layer copies the same base layer (G1).
            let rel = rest.split_once('.').map(|x| x.1).unwrap_or(rest);
            out.insert(name.clone(), teacher_w(&format!("{src}.{rel}"))?);
        }
    }
    let final_norm = teacher_w("model.norm.weight")?;
    out.insert("clover_norm.weight".into(), final_norm.copy());
    out.insert("clover_head_norm.weight".into(), final_norm);
    // Order of random draws: fixed, so a seed gives one init.
    for cell in CELLS {
        out.insert(
            format!("{cell}.input_layernorm.weight"),
            Tensor::ones([h], (Kind::Float, Device::Cpu)),
        );
        out.insert(format!("{cell}.q.weight"), eye_plus_uniform(h));
        out.insert(format!("{cell}.k.weight"), eye_plus_uniform(h));
        out.insert(format!("{cell}.v.weight"), small_uniform(&[h, h]));
        for p in ["q", "k", "v"] {
            out.insert(format!("{cell}.{p}.bias"), zeros(h));
        }
    }
    out.insert("clover_head_mlp.weight".into(), eye_plus_uniform(h));
    out.insert("clover_head_mlp.bias".into(), zeros(h));
    out.insert("clover_head_mlp2.weight".into(), part_eye_uniform(h));
    out.insert("clover_head_mlp2.bias".into(), zeros(h));
    Ok(out)
}
