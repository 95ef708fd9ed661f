//! EAGLE-1 on `DraftHead`'s store (docs/heads.md §1): at row t the embedding of x_{t+1} and the
//! teacher's post-norm feature h_t are concatenated, `fc` maps 2H -> H, one LLaMA decoder layer
//! (without its input norm, as EAGLE-1's layer 0) mixes positions causally, and its output is the
//! predicted feature f_{t+1}, scored by the frozen lm_head. At depths >= 1 the predicted feature
//! is fed back in place of h (`decode::eagle_drafter` does it over the tree).

use std::collections::BTreeMap;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::model::head::DraftHead;
use crate::model::head_config::HeadConfig;
use crate::model::layers::{linear_cast, DecoderLayer, KvCache};

/// torch's `nn.Linear` default init for a tensor with `fan_in` inputs, U(-1/sqrt(fan_in),
/// 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5) for the weight gives the same bound).
pub(crate) fn torch_linear_default(shape: &[i64], fan_in: i64) -> Tensor {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Tensor::rand(shape, (Kind::Float, Device::Cpu)) * (2.0 * bound) - bound
}

/// EAGLE-1's initialisation: a plain `nn.Module`, so every linear layer has torch's default
/// init and every RMSNorm weight is 1 (nothing is copied from the teacher; the embedding table
/// is the teacher's, frozen). CPU draws in `trainable_shapes` order: a seed gives one head.
pub(crate) fn init(cfg: &HeadConfig) -> Result<BTreeMap<String, Tensor>> {
    let h = cfg.hidden_size;
    Ok(cfg
        .trainable_shapes()
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

/// The decoder layer, rebuilt per call from the (possibly cast) trainable weights.
fn layer(head: &DraftHead) -> DecoderLayer {
    let get = |rel: &str| head.w(&format!("layers.0.{rel}"));
    DecoderLayer::from_weights_with(head.draft_llama(), &get, false)
        .unwrap_or_else(|e| panic!("EAGLE-1 layer: {e}"))
}

/// fc(concat[E[next_ids], features]) through the decoder layer: features [B,S,H] (h_t, or a
/// predicted f), next_ids [B,S], positions [B,S]; mask and cache as `DecoderLayer::forward`.
/// Returns the predicted features [B,S,H]. The cache, when given, is advanced by S.
pub fn forward(
    head: &DraftHead,
    features: &Tensor,
    next_ids: &Tensor,
    positions: &Tensor,
    mask: Option<&Tensor>,
    mut cache: Option<&mut KvCache>,
) -> Tensor {
    let features = features.to_kind(head.stream_kind());
    let x = linear_cast(
        &Tensor::cat(&[head.embed(next_ids), features], -1),
        &head.wu("fc.weight"),
        Some(&head.wu("fc.bias")),
    );
    let angles = head.rope().cos_sin(positions);
    let z = layer(head).forward(&x, &angles, mask, cache.as_deref_mut(), 0);
    if let Some(c) = cache {
        c.advance(next_ids.size()[1]);
    }
    z
}

/// Depth 0 from the teacher's pre-norm states u: EAGLE-1 reads h = final_norm(u) (G3). Returns
/// (predicted feature, the same as the carried state).
pub fn depth0(
    head: &DraftHead,
    u: &Tensor,
    next_ids: &Tensor,
    positions: &Tensor,
    mask: Option<&Tensor>,
    cache: Option<&mut KvCache>,
) -> (Tensor, Tensor) {
    let f = forward(head, &head.post_norm(u), next_ids, positions, mask, cache);
    (f.shallow_clone(), f)
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

/// The training forward with EAGLE-1's input noise on h (the regression targets stay clean).
pub fn noisy_forward(
    head: &DraftHead,
    u: &Tensor,
    next_ids: &Tensor,
    amplitude: f64,
    seed: i64,
) -> Tensor {
    let (b, t) = (next_ids.size()[0], next_ids.size()[1]);
    let h = head.post_norm(u);
    let noise = input_noise(&h.size(), amplitude, seed).to_device(h.device());
    let positions = Tensor::arange(t, (Kind::Int64, head.device()))
        .unsqueeze(0)
        .expand([b, t], true);
    forward(
        head,
        &(h + noise.to_kind(head.stream_kind())),
        next_ids,
        &positions,
        None,
        None,
    )
}

/// One step for rows with no context: state [n,H] (a predicted feature), tokens [n]; each row
/// attends only to itself. Used by the held-out chained top-1 (docs/heads.md §1.3); decoding
/// uses `decode::eagle_drafter`, which attends over the prefix and the tree ancestors.
pub fn step_alone(head: &DraftHead, state: &Tensor, tokens: &Tensor) -> (Tensor, Tensor) {
    let n = tokens.size()[0];
    let positions = Tensor::zeros([n, 1], (Kind::Int64, head.device()));
    let f = forward(
        head,
        &state.unsqueeze(1),
        &tokens.reshape([n, 1]),
        &positions,
        None,
        None,
    )
    .squeeze_dim(1);
    (f.shallow_clone(), f)
}
