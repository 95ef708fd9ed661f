//! Medusa-1 (docs/heads.md §2): K heads on the teacher's last post-norm state h_t; head k is a
//! residual SiLU block, o = h + SiLU(W_k h + b_k), and its own linear layer to the vocabulary,
//! initialised from the lm_head; head k at row t predicts x_{t+k+2}. No head sees a drafted
//! token: depth k's candidates are the same for every parent.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};

use crate::model::arch::{HeadArch, LossDefaults, TokenRows};
use crate::model::head_config::{HeadConfig, HeadKind, HeadOptions};
use crate::model::layers::{linear_cast, KvCache};
use crate::model::store::{torch_linear_default, HeadStore};
use crate::model::teacher::Teacher;

/// The Medusa-1 architecture.
pub struct Medusa;

impl HeadArch for Medusa {
    fn kind(&self) -> HeadKind {
        HeadKind::Medusa
    }

    /// Medusa-1's `medusa_head` state dict (docs/heads.md §2.4): per depth k an
    /// `nn.Sequential(ResBlock, Linear)`, i.e. `{k}.0.linear.{weight,bias}` and `{k}.1.weight`.
    fn trainable_shapes(&self, cfg: &HeadConfig) -> Vec<(String, Vec<i64>)> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        (0..cfg.options.num_depths)
            .flat_map(|k| {
                [
                    (format!("{k}.0.linear.weight"), vec![h, h]),
                    (format!("{k}.0.linear.bias"), vec![h]),
                    (format!("{k}.1.weight"), vec![v, h]),
                ]
            })
            .collect()
    }

    /// None: its KV cache is empty.
    fn decoder_layers(&self, _opts: &HeadOptions) -> i64 {
        0
    }

    fn described_size(&self, opts: &HeadOptions) -> String {
        format!("with num_heads = {}", opts.num_depths)
    }

    /// The block's weight zero (each head starts as the lm_head on h), its bias torch's
    /// default, the vocabulary projection a copy of the teacher's lm_head.
    fn init(&self, teacher: &Teacher, cfg: &HeadConfig) -> Result<BTreeMap<String, Tensor>> {
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
            // The store copies every tensor into its own variable: no copy needed here.
            out.insert(format!("{k}.1.weight"), lm_head.shallow_clone());
        }
        Ok(out)
    }

    /// Head 0 from pre-norm states u; the carried state is h itself.
    fn depth0(
        &self,
        w: &HeadStore,
        u: &Tensor,
        _rows: &TokenRows,
        _cache: Option<&mut KvCache>,
    ) -> (Tensor, Tensor) {
        let h = w.post_norm(u);
        (block(w, 0, &h), h)
    }

    /// Head `depth` on the carried h (the drafted token is not used).
    fn step(&self, w: &HeadStore, depth: i64, h: &Tensor, _tokens: &Tensor) -> (Tensor, Tensor) {
        let heads = w.config().options.num_depths;
        assert!(
            depth < heads,
            "Medusa has {heads} heads, depth {depth} asked for"
        );
        (block(w, depth, h), h.shallow_clone())
    }

    /// Head i on h[:, :T-i] (its rows line up with the targets sliced [:, i:], as Clover-2's
    /// depth i, G5).
    fn depth_outputs(&self, w: &HeadStore, u: &Tensor, _next_ids: &Tensor) -> Vec<Tensor> {
        let h = w.post_norm(u);
        let t = h.size()[1];
        (0..w.config().options.num_depths.min(t))
            .map(|i| block(w, i, &h.narrow(1, 0, t - i)))
            .collect()
    }

    /// Head k's own vocabulary projection of its block output o.
    fn own_logits(&self, w: &HeadStore, depth: i64, o: &Tensor) -> Option<Tensor> {
        Some(linear_cast(o, &w.wu(&format!("{depth}.1.weight")), None))
    }

    fn loss_defaults(&self) -> LossDefaults {
        LossDefaults {
            regression: 0.0,
            distillation: 1.0,
            input_noise: 0.0,
        }
    }

    fn trains_vocab_projection(&self) -> bool {
        true
    }

    /// Medusa's loader reads `medusa_lm_head.safetensors`.
    fn weights_file(&self) -> &'static str {
        "medusa_lm_head.safetensors"
    }

    fn frozen_names(&self) -> &'static [&'static str] {
        &[]
    }

    /// MedusaConfig's keys (its `base_model_name_or_path` names the teacher's hub id or path,
    /// which clover does not know: the user adds it for Medusa's own loader).
    fn export_config_keys(&self, opts: &HeadOptions, config: &mut Map<String, Value>) {
        config.insert("medusa_num_heads".into(), opts.num_depths.into());
        config.insert("medusa_num_layers".into(), 1.into());
    }

    fn deepest_draft(&self, opts: &HeadOptions) -> Option<usize> {
        Some(opts.num_depths as usize)
    }
}

/// Head k's residual block on h [..,H].
fn block(w: &HeadStore, k: i64, h: &Tensor) -> Tensor {
    let z = linear_cast(
        h,
        &w.wu(&format!("{k}.0.linear.weight")),
        Some(&w.wu(&format!("{k}.0.linear.bias"))),
    );
    h + z.silu()
}
