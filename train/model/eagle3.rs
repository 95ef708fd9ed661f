//! EAGLE-3 (docs/heads.md §6): the teacher's states at three layers (low, middle, high) are
//! concatenated and fused by `fc` (3H -> H); one decoder layer (`model::eagle3_layer`) reads the
//! token embedding beside that fused state (or, at later steps, its own previous output); a final
//! norm and its own lm_head score a draft vocabulary. It trains with training-time test: the draft
//! is unrolled `ttt_steps` steps, each attending to the teacher-forced prefix and to its own
//! earlier steps at the same row, exactly as a tree node attends to the committed prefix and its
//! ancestors when decoding (`decode::drafter::tree_attention`).

use std::collections::BTreeMap;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::checks::Problems;
use crate::model::arch::{HeadArch, LossDefaults, TokenRows, TokenTable};
use crate::model::config::LlamaConfig;
use crate::model::eagle3_layer::Eagle3Layer;
use crate::model::head_config::{HeadConfig, HeadKind, HeadOptions};
use crate::model::layers::{linear_cast, KvCache};
use crate::model::store::{torch_linear_default, HeadStore};
use crate::model::teacher::Teacher;

/// The EAGLE-3 authors' training-time-test length (`eagle/traineagle3`).
pub const REFERENCE_TTT_STEPS: i64 = 7;

/// The EAGLE-3 architecture.
pub struct Eagle3;

/// [2, L/2, L-3] of an L-layer teacher, the reference's low, middle and high layers.
pub fn default_teacher_layers(layers: i64) -> Vec<i64> {
    vec![2, layers / 2, layers - 3]
}

/// The draft vocabulary a training run gives an EAGLE-3 head over a V-token teacher when its
/// config names none: a quarter of V, EAGLE-3's own ratio (32,000 of LLaMA-3's 128,256), so
/// 12,288 of SmolLM2's 49,152 (docs/heads.md §6.3).
pub fn default_draft_vocab(vocab_size: i64) -> usize {
    (vocab_size as usize / 4).max(1)
}

impl HeadArch for Eagle3 {
    fn kind(&self) -> HeadKind {
        HeadKind::Eagle3
    }

    /// `fc` [H, kH] without bias, the layer `layers.0.*` (q/k/v over 2H, `hidden_norm`), the
    /// final `norm` and `lm_head` [N, H] over the draft vocabulary (N = V without one).
    fn trainable_shapes(&self, cfg: &HeadConfig) -> Vec<(String, Vec<i64>)> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let q_out = cfg.num_attention_heads * cfg.head_dim;
        let kv_out = cfg.num_key_value_heads * cfg.head_dim;
        let taps = cfg.options.teacher_layers.as_ref().map_or(3, Vec::len) as i64;
        let vocab = cfg.options.draft_vocab.map_or(cfg.vocab_size, |n| n as i64);
        let l = "layers.0";
        [
            ("fc.weight".to_string(), vec![h, taps * h]),
            (format!("{l}.self_attn.q_proj.weight"), vec![q_out, 2 * h]),
            (format!("{l}.self_attn.k_proj.weight"), vec![kv_out, 2 * h]),
            (format!("{l}.self_attn.v_proj.weight"), vec![kv_out, 2 * h]),
            (format!("{l}.self_attn.o_proj.weight"), vec![h, q_out]),
            (format!("{l}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{l}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{l}.mlp.down_proj.weight"), vec![h, i]),
            (format!("{l}.input_layernorm.weight"), vec![h]),
            (format!("{l}.hidden_norm.weight"), vec![h]),
            (format!("{l}.post_attention_layernorm.weight"), vec![h]),
            ("norm.weight".to_string(), vec![h]),
            ("lm_head.weight".to_string(), vec![vocab, h]),
        ]
        .into_iter()
        .collect()
    }

    fn decoder_layers(&self, _opts: &HeadOptions) -> i64 {
        1
    }

    fn described_size(&self, opts: &HeadOptions) -> String {
        format!(
            "with one decoder layer, teacher_layers {:?} and draft_vocab {:?}",
            opts.teacher_layers, opts.draft_vocab
        )
    }

    /// A plain `nn.Module` as the reference's: torch's default init for every linear layer
    /// (lm_head included), RMSNorm weights 1. CPU draws in `trainable_shapes` order.
    fn init(&self, _teacher: &Teacher, cfg: &HeadConfig) -> Result<BTreeMap<String, Tensor>> {
        Ok(self
            .trainable_shapes(cfg)
            .into_iter()
            .map(|(name, shape)| {
                let t = match shape.len() {
                    1 => Tensor::ones(shape.as_slice(), (Kind::Float, Device::Cpu)),
                    _ => torch_linear_default(&shape, shape[1]),
                };
                (name, t)
            })
            .collect())
    }

    fn token_table(&self) -> TokenTable {
        TokenTable::EmbedTokens
    }

    /// `u` here is the concatenated teacher states of `teacher_layers` [B,S,kH]; the carried
    /// state is the layer's output (pre-norm), fed back as the next step's hidden state.
    fn depth0(
        &self,
        w: &HeadStore,
        u: &Tensor,
        rows: &TokenRows,
        cache: Option<&mut KvCache>,
    ) -> (Tensor, Tensor) {
        let f = layer_pass(w, &fuse(w, u), rows, cache);
        (f.shallow_clone(), f)
    }

    /// One step for rows with no context (each row attends only to itself): the held-out
    /// chained top-1's approximation, as EAGLE-1's (docs/heads.md §1.3).
    fn step(
        &self,
        w: &HeadStore,
        _depth: i64,
        state: &Tensor,
        tokens: &Tensor,
    ) -> (Tensor, Tensor) {
        let n = tokens.size()[0];
        let positions = Tensor::zeros([n, 1], (Kind::Int64, w.device()));
        let rows = TokenRows {
            next_ids: &tokens.reshape([n, 1]),
            positions: &positions,
            mask: None,
        };
        let f = layer_pass(w, &state.unsqueeze(1), &rows, None).squeeze_dim(1);
        (f.shallow_clone(), f)
    }

    /// Training-time test: `ttt_steps` unrolled steps, step j's rows [B, T-j].
    fn depth_outputs(&self, w: &HeadStore, u: &Tensor, next_ids: &Tensor) -> Vec<Tensor> {
        let steps = self.trained_depths(&w.config().options);
        ttt_outputs(w, u, next_ids, steps)
    }

    /// norm then the head's own lm_head: [.., N] over the draft vocabulary.
    fn own_logits(&self, w: &HeadStore, _depth: i64, o: &Tensor) -> Option<Tensor> {
        let normed = w.norm("norm.weight", &o.to_kind(w.stream_kind()));
        Some(linear_cast(&normed, &w.wu("lm_head.weight"), None))
    }

    /// Distillation only: EAGLE-3 drops EAGLE-1's feature regression and its noise.
    fn loss_defaults(&self) -> LossDefaults {
        LossDefaults {
            regression: 0.0,
            distillation: 1.0,
            input_noise: 0.0,
        }
    }

    fn trained_depths(&self, opts: &HeadOptions) -> i64 {
        opts.ttt_steps.unwrap_or(REFERENCE_TTT_STEPS)
    }

    /// Its lm_head trains, so the loss runs unchunked (`DraftHead::loss_chunk`).
    fn trains_vocab_projection(&self) -> bool {
        true
    }

    /// The teacher's `embed_tokens`, which its loaders may take from the verifier instead.
    fn frozen_names(&self) -> &'static [&'static str] {
        &["embed_tokens.weight"]
    }

    fn speculators_model_type(&self) -> Option<&'static str> {
        Some("eagle3")
    }

    fn takes_draft_vocab(&self) -> bool {
        true
    }

    fn searches_trees(&self) -> bool {
        false
    }

    fn attends_over_tree(&self) -> bool {
        true
    }

    fn tree_forward(
        &self,
        w: &HeadStore,
        features: &Tensor,
        rows: &TokenRows,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        Ok(layer_pass(w, features, rows, cache))
    }

    fn teacher_layers(&self, opts: &HeadOptions, teacher_layers: i64) -> Option<Vec<i64>> {
        Some(
            opts.teacher_layers
                .clone()
                .unwrap_or_else(|| default_teacher_layers(teacher_layers)),
        )
    }

    fn training_defaults(&self, opts: &mut HeadOptions, teacher: &LlamaConfig) {
        opts.teacher_layers = self.teacher_layers(opts, teacher.num_hidden_layers);
        opts.ttt_steps = Some(self.trained_depths(opts));
        opts.draft_vocab = opts
            .draft_vocab
            .or(Some(default_draft_vocab(teacher.vocab_size)));
    }

    /// Every option it reads applies (the draft vocabulary, TTT steps, teacher layers).
    fn check_options(&self, _opts: &HeadOptions, _p: &mut Problems) {}
}

/// fc over the concatenated teacher states [B,S,kH] -> [B,S,H].
fn fuse(w: &HeadStore, u: &Tensor) -> Tensor {
    linear_cast(&u.to_kind(w.stream_kind()), &w.wu("fc.weight"), None)
}

/// One pass of the layer over rows (their tokens' embeddings beside `hidden` [B,S,H]), attending
/// over the cache's rows and their own (the rows' mask, else causal). The cache, when given, is
/// advanced by S.
fn layer_pass(
    w: &HeadStore,
    hidden: &Tensor,
    rows: &TokenRows,
    cache: Option<&mut KvCache>,
) -> Tensor {
    let layer = Eagle3Layer::of(w);
    let angles = w.rope().cos_sin(rows.positions);
    let hidden = hidden.to_kind(w.stream_kind());
    let p = layer.project(&w.embed(rows.next_ids), &hidden, &angles);
    match cache {
        Some(c) => {
            let (keys, values) = c.append(0, &p.k, &p.v);
            let out = layer.finish(&p, &keys, &values, rows.mask);
            c.advance(rows.next_ids.size()[1]);
            out
        }
        None => layer.finish(&p, &p.k, &p.v, rows.mask),
    }
}

/// The unrolled training forward. Step 0 runs causally on (x_{t+1}, fc(u_t)); step j >= 1 at
/// row t reads the token x_{t+j+1} (teacher-forced: the one step j-1 was to predict) beside step
/// j-1's output at row t, at position t+j, and attends to step 0's rows <= t and to its own row
/// of steps 1..j. Step j's output keeps the rows t < T-j, whose tokens exist.
fn ttt_outputs(w: &HeadStore, u: &Tensor, next_ids: &Tensor, steps: i64) -> Vec<Tensor> {
    let layer = Eagle3Layer::of(w);
    let t = next_ids.size()[1];
    let positions = w.positions_like(next_ids);
    let mut hidden = fuse(w, u);
    let (mut keys, mut values, mut outs) = (Vec::new(), Vec::new(), Vec::new());
    for j in 0..steps {
        if j >= t {
            outs.push(hidden.narrow(1, 0, 0));
            continue;
        }
        let ids = next_ids.narrow(1, j, t - j).constant_pad_nd([0, j]);
        let angles = w.rope().cos_sin(&(&positions + j));
        let p = layer.project(&w.embed(&ids), &hidden, &angles);
        keys.push(p.k.shallow_clone());
        values.push(p.v.shallow_clone());
        let mask = (j > 0).then(|| ttt_mask(t, j, w.device()));
        let out = layer.finish(
            &p,
            &Tensor::cat(&keys, 2),
            &Tensor::cat(&values, 2),
            mask.as_ref(),
        );
        outs.push(out.narrow(1, 0, t - j));
        hidden = out;
    }
    outs
}

/// Step j's mask over [step 0's T rows, steps 1..j's T rows each] [1,1,T,(j+1)T]: causal over
/// step 0, only its own row in each later step.
fn ttt_mask(t: i64, j: i64, device: Device) -> Tensor {
    let causal = crate::model::layers::causal_mask(0, t, device).view([t, t]);
    let own = Tensor::eye(t, (Kind::Bool, device));
    let mut blocks = vec![causal];
    blocks.extend((0..j).map(|_| own.shallow_clone()));
    Tensor::cat(&blocks, 1).view([1, 1, t, (j + 1) * t])
}
