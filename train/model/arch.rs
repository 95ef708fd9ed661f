//! What a head kind is (docs/heads.md): one trait that each architecture (Clover-2, EAGLE-1,
//! Medusa-1) implements in its own file, over the shared weight access of `model::store`. A
//! `DraftHead` resolves its kind to one of these once, at load (`model::kinds::arch_of`), and
//! never asks which kind it is again: training, decoding and export call the trait, and what
//! differs between kinds is either a method or a named capability.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde_json::{Map, Value};
use tch::Tensor;

use crate::checks::Problems;
use crate::model::config::LlamaConfig;
use crate::model::head_config::{HeadConfig, HeadKind, HeadOptions};
use crate::model::layers::KvCache;
use crate::model::store::HeadStore;
use crate::model::teacher::Teacher;

/// The loss recipe a head kind trains with when the config leaves a weight out (docs/heads.md §3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossDefaults {
    /// Weight of the feature-regression term.
    pub regression: f64,
    /// Weight of the distillation term.
    pub distillation: f64,
    /// Amplitude of the uniform noise on the input features in training (EAGLE's).
    pub input_noise: f64,
}

/// Which frozen teacher table a head embeds its tokens with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenTable {
    /// The teacher's lm_head weight (Clover-2's G8, and Medusa, which embeds nothing).
    LmHead,
    /// The teacher's own `model.embed_tokens` (EAGLE).
    EmbedTokens,
}

impl TokenTable {
    /// The teacher tensor this table is.
    pub fn of(self, teacher: &Teacher) -> Result<&Tensor> {
        match self {
            TokenTable::LmHead => Ok(teacher.lm_head_weight()),
            TokenTable::EmbedTokens => teacher.weight("model.embed_tokens.weight"),
        }
    }
}

/// The token rows a draft forward reads beside its features: at row t the token that follows
/// the features' position (next_ids [B,S], the G4 shift done by the caller), the rows'
/// positions [B,S] and an attention mask as `Teacher::forward`'s (None: causal).
pub struct TokenRows<'a> {
    pub next_ids: &'a Tensor,
    pub positions: &'a Tensor,
    pub mask: Option<&'a Tensor>,
}

/// One draft architecture.
pub trait HeadArch: Sync {
    /// The kind's name in configs and exports.
    fn kind(&self) -> HeadKind;

    // --- shape and initialisation -------------------------------------------------------

    /// Every trainable tensor with its reference name and shape.
    fn trainable_shapes(&self, cfg: &HeadConfig) -> Vec<(String, Vec<i64>)>;
    /// How many LLaMA decoder layers of its own the draft runs (the layers of its KV cache).
    fn decoder_layers(&self, opts: &HeadOptions) -> i64;
    /// The config keys that decide which tensors the head has, for an error about them.
    fn described_size(&self, opts: &HeadOptions) -> String;
    /// The kind's reference initialisation as named CPU f32 tensors (the caller seeds torch).
    fn init(&self, teacher: &Teacher, cfg: &HeadConfig) -> Result<BTreeMap<String, Tensor>>;
    /// The frozen table the draft embeds tokens with.
    fn token_table(&self) -> TokenTable {
        TokenTable::LmHead
    }

    // --- the forward -----------------------------------------------------------------------

    /// Depth 0 from the teacher's pre-norm states u [B,S,H]: (o0, the state depth 1 steps
    /// from). A cache, when given, is advanced.
    fn depth0(
        &self,
        w: &HeadStore,
        u: &Tensor,
        rows: &TokenRows,
        cache: Option<&mut KvCache>,
    ) -> (Tensor, Tensor);
    /// The step to depth `depth` >= 1 from carried states [..,H] and the chosen tokens [..]:
    /// (o, new state). Kinds whose later depths attend over the tree (`attends_over_tree`) step
    /// here with no context, each row alone.
    fn step(&self, w: &HeadStore, depth: i64, state: &Tensor, tokens: &Tensor) -> (Tensor, Tensor);
    /// The training forward, every depth teacher-forced as the reference's `get_all_head`:
    /// depth i's outputs have T-i rows, lined up with the targets sliced [:, i:].
    fn depth_outputs(&self, w: &HeadStore, u: &Tensor, next_ids: &Tensor) -> Vec<Tensor>;
    /// The training forward with the kind's recipe noise, drawn from a generator seeded with
    /// `noise_seed` (so a resumed run draws the same). Default: `depth_outputs` as it is.
    fn training_outputs(
        &self,
        w: &HeadStore,
        u: &Tensor,
        next_ids: &Tensor,
        _noise_seed: i64,
    ) -> Vec<Tensor> {
        self.depth_outputs(w, u, next_ids)
    }
    /// The kind's own vocabulary projection of depth `depth`'s outputs, where it has one
    /// (Medusa's blocks, EAGLE-3's norm and lm_head), over the head's vocabulary: the draft
    /// vocabulary's N columns when the head has one, else all V; None: the frozen teacher
    /// lm_head scores them.
    fn own_logits(&self, _w: &HeadStore, _depth: i64, _o: &Tensor) -> Option<Tensor> {
        None
    }

    // --- training --------------------------------------------------------------------------

    /// The loss weights in force when the config sets none.
    fn loss_defaults(&self) -> LossDefaults;
    /// Depths the training loss sees (EAGLE-1 trains its single step).
    fn trained_depths(&self, opts: &HeadOptions) -> i64 {
        opts.num_depths
    }
    /// Whether the vocabulary projection trains (Medusa's does): the chunked loss sends the
    /// distillation gradient back through the depth outputs only, so such a head needs the
    /// unchunked loss.
    fn trains_vocab_projection(&self) -> bool {
        false
    }

    // --- export ----------------------------------------------------------------------------

    /// The weights file its loaders read.
    fn weights_file(&self) -> &'static str {
        "model.safetensors"
    }
    /// The frozen copies of the `token_table` a full state dict of this kind holds (its own
    /// loader's strict key set); a head's loader skips them.
    fn frozen_names(&self) -> &'static [&'static str];
    /// Keys this kind's loaders read from config.json beyond the teacher's and clover's.
    fn export_config_keys(&self, _opts: &HeadOptions, _config: &mut Map<String, Value>) {}

    // --- capabilities ----------------------------------------------------------------------

    /// Whether the head can train and draft over a draft vocabulary (`draft_vocab`,
    /// `--draft-vocab`).
    fn takes_draft_vocab(&self) -> bool {
        false
    }
    /// Whether the searched (`auto`) and grown (`dynamic`) trees are validated on this kind.
    fn searches_trees(&self) -> bool {
        false
    }
    /// The deepest draft the head has, where it is bounded (Medusa: one block per depth).
    fn deepest_draft(&self, _opts: &HeadOptions) -> Option<usize> {
        None
    }
    /// Whether its depths >= 1 attend over the committed prefix and their tree ancestors
    /// (EAGLE), so decoding drafts through `tree_forward` instead of `step`.
    fn attends_over_tree(&self) -> bool {
        false
    }
    /// The attending forward of `attends_over_tree` kinds: features [B,S,H] (depth 0's, or a
    /// predicted parent's), the tokens after them, positions, mask and cache as the teacher's.
    fn tree_forward(
        &self,
        _w: &HeadStore,
        _features: &Tensor,
        _rows: &TokenRows,
        _cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        bail!(
            "a {} head has no tree-attending forward",
            self.kind().name()
        )
    }
    /// The teacher layers whose inputs the draft reads instead of the last pre-norm state u
    /// (EAGLE-3's low, middle and high features, concatenated), for a teacher of
    /// `teacher_layers` layers; None: it reads u.
    fn teacher_layers(&self, _opts: &HeadOptions, _teacher_layers: i64) -> Option<Vec<i64>> {
        None
    }
    /// Fills in what a training run states explicitly for this kind where its config leaves
    /// it out (so its checkpoints and exports carry the resolved value).
    fn training_defaults(&self, _opts: &mut HeadOptions, _teacher: &LlamaConfig) {}
    /// vLLM speculators' `speculators_model_type` of this kind, where `clover export --format
    /// speculators` can write it (EAGLE-3: "eagle3").
    fn speculators_model_type(&self) -> Option<&'static str> {
        None
    }
    /// Records the options that do not apply to this kind or are out of its range.
    fn check_options(&self, opts: &HeadOptions, p: &mut Problems) {
        if opts.draft_vocab.is_some() && !self.takes_draft_vocab() {
            p.require(
                false,
                "draft_vocab",
                format!(
                    "works with Clover-2 and EAGLE-3 heads; this head is {}",
                    self.kind().name()
                ),
            );
        }
        for (key, set) in [
            ("ttt_steps", opts.ttt_steps.is_some()),
            ("teacher_layers", opts.teacher_layers.is_some()),
        ] {
            p.require(
                !set,
                key,
                format!(
                    "works with EAGLE-3 heads; this head is {}",
                    self.kind().name()
                ),
            );
        }
    }

    // --- what the options resolve to ---------------------------------------------------------

    /// The regression weight in force.
    fn regression_weight(&self, opts: &HeadOptions) -> f64 {
        opts.regression_weight
            .unwrap_or(self.loss_defaults().regression)
    }
    /// The distillation weight in force.
    fn distillation_weight(&self, opts: &HeadOptions) -> f64 {
        opts.distillation_weight
            .unwrap_or(self.loss_defaults().distillation)
    }
    /// The input-noise amplitude in force.
    fn input_noise(&self, opts: &HeadOptions) -> f64 {
        opts.input_noise.unwrap_or(self.loss_defaults().input_noise)
    }
}
