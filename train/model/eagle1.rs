//! EAGLE-1 (docs/heads.md §1): at row t the embedding of x_{t+1} and the teacher's post-norm
//! feature h_t are concatenated, `fc` maps 2H -> H, one LLaMA decoder layer (without its input
//! norm, as EAGLE-1's layer 0) mixes positions causally, and its output is the predicted feature
//! f_{t+1}, scored by the frozen lm_head. At depths >= 1 the predicted feature is fed back in
//! place of h, attending over the prefix and the tree ancestors (`tree_forward`, driven by
//! `decode::drafter::tree_attention`).

use std::collections::BTreeMap;

use anyhow::Result;
use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};

use crate::model::arch::{HeadArch, LossDefaults, TokenRows, TokenTable};
use crate::model::head_config::{HeadConfig, HeadKind, HeadOptions};
use crate::model::layers::{linear_cast, KvCache};
use crate::model::store::{decoder_layer_shapes, torch_linear_default, HeadStore};
use crate::model::teacher::Teacher;

/// The EAGLE-1 architecture.
pub struct Eagle1;

impl HeadArch for Eagle1 {
    fn kind(&self) -> HeadKind {
        HeadKind::Eagle1
    }

    /// EAGLE-1's state dict (docs/heads.md §1.4): `fc` [H, 2H] + bias over concat[emb, feature]
    /// and decoder layer 0 without its input norm.
    fn trainable_shapes(&self, cfg: &HeadConfig) -> Vec<(String, Vec<i64>)> {
        let h = cfg.hidden_size;
        let mut out = vec![
            ("fc.weight".to_string(), vec![h, 2 * h]),
            ("fc.bias".to_string(), vec![h]),
        ];
        out.extend(decoder_layer_shapes(cfg, "layers.0", false));
        out
    }

    fn decoder_layers(&self, _opts: &HeadOptions) -> i64 {
        1
    }

    fn described_size(&self, _opts: &HeadOptions) -> String {
        "with one decoder layer".into()
    }

    /// A plain `nn.Module`: every linear layer has torch's default init and every RMSNorm
    /// weight is 1 (nothing is copied from the teacher; the embedding table is the teacher's,
    /// frozen). CPU draws in `trainable_shapes` order: a seed gives one head.
    fn init(&self, _teacher: &Teacher, cfg: &HeadConfig) -> Result<BTreeMap<String, Tensor>> {
        let h = cfg.hidden_size;
        Ok(self
            .trainable_shapes(cfg)
            .into_iter()
            .map(|(name, shape)| {
                let t = if name.ends_with("layernorm.weight") {
                    Tensor::ones(shape.as_slice(), (Kind::Float, Device::Cpu))
                } else {
                    // A bias's fan-in is its layer's: fc's is 2H.
                    let fan_in = if shape.len() == 2 { shape[1] } else { 2 * h };
                    torch_linear_default(&shape, fan_in)
                };
                (name, t)
            })
            .collect())
    }

    fn token_table(&self) -> TokenTable {
        TokenTable::EmbedTokens
    }

    /// From the teacher's pre-norm states u: EAGLE-1 reads h = final_norm(u) (G3). The carried
    /// state is the predicted feature itself.
    fn depth0(
        &self,
        w: &HeadStore,
        u: &Tensor,
        rows: &TokenRows,
        cache: Option<&mut KvCache>,
    ) -> (Tensor, Tensor) {
        let f = forward(w, &w.post_norm(u), rows, cache);
        (f.shallow_clone(), f)
    }

    /// One step for rows with no context: state [n,H] (a predicted feature), tokens [n]; each
    /// row attends only to itself. Used by the held-out chained top-1 (docs/heads.md §1.3);
    /// decoding attends over the prefix and the tree ancestors (`tree_forward`).
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
        let f = forward(w, &state.unsqueeze(1), &rows, None).squeeze_dim(1);
        (f.shallow_clone(), f)
    }

    /// Its one trained depth.
    fn depth_outputs(&self, w: &HeadStore, u: &Tensor, next_ids: &Tensor) -> Vec<Tensor> {
        let positions = w.positions_like(next_ids);
        let rows = TokenRows {
            next_ids,
            positions: &positions,
            mask: None,
        };
        vec![self.depth0(w, u, &rows, None).0]
    }

    /// With EAGLE-1's uniform input noise on h (the regression targets stay clean).
    fn training_outputs(
        &self,
        w: &HeadStore,
        u: &Tensor,
        next_ids: &Tensor,
        noise_seed: i64,
    ) -> Vec<Tensor> {
        let amplitude = self.input_noise(&w.config().options);
        if amplitude <= 0.0 {
            return self.depth_outputs(w, u, next_ids);
        }
        let h = w.post_norm(u);
        let noise = input_noise(&h.size(), amplitude, noise_seed).to_device(h.device());
        let positions = w.positions_like(next_ids);
        let rows = TokenRows {
            next_ids,
            positions: &positions,
            mask: None,
        };
        vec![forward(
            w,
            &(h + noise.to_kind(w.stream_kind())),
            &rows,
            None,
        )]
    }

    fn loss_defaults(&self) -> LossDefaults {
        LossDefaults {
            regression: 1.0,
            distillation: 0.1,
            input_noise: 0.2,
        }
    }

    /// EAGLE-1 trains its single step only (its noise stands in for the drift of later steps).
    fn trained_depths(&self, _opts: &HeadOptions) -> i64 {
        1
    }

    /// The teacher's `embed_tokens`: EAGLE-1's loader is strict.
    fn frozen_names(&self) -> &'static [&'static str] {
        &["embed_tokens.weight"]
    }

    /// EAGLE-1's EConfig: `fc` has a bias.
    fn export_config_keys(&self, _opts: &HeadOptions, config: &mut Map<String, Value>) {
        config.insert("bias".into(), true.into());
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
        Ok(forward(w, features, rows, cache))
    }
}

/// fc(concat[E[next_ids], features]) through the decoder layer: features [B,S,H] (h_t, or a
/// predicted f), the rows' next_ids, positions and mask. Returns the predicted features
/// [B,S,H]. The cache, when given, is advanced by S.
fn forward(
    w: &HeadStore,
    features: &Tensor,
    rows: &TokenRows,
    mut cache: Option<&mut KvCache>,
) -> Tensor {
    let features = features.to_kind(w.stream_kind());
    let x = linear_cast(
        &Tensor::cat(&[w.embed(rows.next_ids), features], -1),
        &w.wu("fc.weight"),
        Some(&w.wu("fc.bias")),
    );
    let angles = w.rope().cos_sin(rows.positions);
    let layer = &w.decoder_layers("layers", false)[0];
    let z = layer.forward(&x, &angles, rows.mask, cache.as_deref_mut(), 0);
    if let Some(c) = cache {
        c.advance(rows.next_ids.size()[1]);
    }
    z
}

/// The uniform noise EAGLE-1 adds to its input features in training: (U[0,1) - 0.5) ·
/// amplitude · 512 / T, T the batch's padded length (its `AddUniformNoise`), drawn on the CPU
/// from a generator seeded with `seed`.
pub fn input_noise(shape: &[i64], amplitude: f64, seed: i64) -> Tensor {
    let t = shape.get(1).copied().unwrap_or(1).max(1) as f64;
    crate::rng::seeded(seed, || {
        (Tensor::rand(shape, (Kind::Float, Device::Cpu)) - 0.5) * (amplitude * 512.0 / t)
    })
}
