//! Medusa-1 on `DraftHead`'s store (docs/heads.md §2): K heads on the teacher's last post-norm
//! state h_t; head k is a residual SiLU block, o = h + SiLU(W_k h + b_k), and its own linear
//! layer to the vocabulary, initialised from the lm_head; head k at row t predicts x_{t+k+2}.
//! No head sees a drafted token: depth k's candidates are the same for every parent.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use crate::model::eagle::torch_linear_default;
use crate::model::head::DraftHead;
use crate::model::head_config::HeadConfig;
use crate::model::layers::linear_cast;
use crate::model::teacher::Teacher;

/// Medusa-1's initialisation: the block's weight zero (each head starts as the lm_head on h),
/// its bias torch's default, the vocabulary projection a copy of the teacher's lm_head.
pub(crate) fn init(teacher: &Teacher, cfg: &HeadConfig) -> Result<BTreeMap<String, Tensor>> {
    let h = cfg.hidden_size;
    let lm_head = teacher
        .weight("lm_head.weight")
        .context("teacher lm_head for the Medusa init")?
        .to_kind(Kind::Float)
        .to_device(Device::Cpu);
    let mut out = BTreeMap::new();
    for k in 0..cfg.options.num_depths {
        out.insert(
            format!("{k}.0.linear.weight"),
            Tensor::zeros([h, h], (Kind::Float, Device::Cpu)),
        );
        out.insert(format!("{k}.0.linear.bias"), torch_linear_default(&[h], h));
        // `from_tensors` copies every tensor into its own variable: no copy needed here.
        out.insert(format!("{k}.1.weight"), lm_head.shallow_clone());
    }
    Ok(out)
}

/// Head k's residual block on h [..,H].
pub fn block(head: &DraftHead, k: i64, h: &Tensor) -> Tensor {
    let z = linear_cast(
        h,
        &head.wu(&format!("{k}.0.linear.weight")),
        Some(&head.wu(&format!("{k}.0.linear.bias"))),
    );
    h + z.silu()
}

/// Head k's logits of its block output o.
pub fn logits(head: &DraftHead, k: i64, o: &Tensor) -> Tensor {
    linear_cast(o, &head.wu(&format!("{k}.1.weight")), None)
}

/// Depth 0 (head 0) from pre-norm states u; the carried state is h itself.
pub fn depth0(head: &DraftHead, u: &Tensor) -> (Tensor, Tensor) {
    let h = head.post_norm(u);
    (block(head, 0, &h), h)
}

/// Depth k from the carried h (the drafted token is not used).
pub fn step(head: &DraftHead, k: i64, h: &Tensor) -> (Tensor, Tensor) {
    assert!(
        k < head.config().options.num_depths,
        "Medusa has {} heads, depth {k} asked for",
        head.config().options.num_depths
    );
    (block(head, k, h), h.shallow_clone())
}

/// Training forward: head i on h[:, :T-i] (its rows line up with the targets sliced [:, i:],
/// as Clover-2's depth i, G5).
pub fn depth_outputs(head: &DraftHead, u: &Tensor) -> Vec<Tensor> {
    let h = head.post_norm(u);
    let t = h.size()[1];
    (0..head.config().options.num_depths.min(t))
        .map(|i| block(head, i, &h.narrow(1, 0, t - i)))
        .collect()
}
