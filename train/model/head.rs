//! A draft head attached to a frozen teacher: its kind's architecture (`model::arch`, resolved
//! once at load by `model::kinds::arch_of`), its weights (`model::store`) and, when it was
//! trained with one, its draft vocabulary. Everything below calls the architecture; nothing
//! here asks which kind a head is.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use tch::{nn, Device, Kind, Tensor};

use crate::model::arch::{HeadArch, TokenRows};
use crate::model::draft_vocab::{DraftVocab, D2T, T2D};
use crate::model::finite::check_finite_tensors;
use crate::model::head_config::HeadConfig;
use crate::model::kinds::{arch_of, validate};
use crate::model::layers::KvCache;
use crate::model::store::{FrozenParts, HeadStore};
use crate::model::teacher::Teacher;

/// A draft head of any kind.
pub struct DraftHead {
    arch: &'static dyn HeadArch,
    store: HeadStore,
    /// The trained draft vocabulary (`draft_vocab = N`, EAGLE-3): the head's logits cover only
    /// these tokens. None: the full vocabulary.
    draft_vocab: Option<DraftVocab>,
    /// The teacher layers whose inputs it reads (`HeadArch::teacher_layers`), resolved against
    /// its teacher; None: the last pre-norm state u.
    teacher_layers: Option<Vec<i64>>,
}

impl DraftHead {
    /// A head with its kind's reference initialisation from the teacher, seeded.
    pub fn new(teacher: &Teacher, cfg: HeadConfig, seed: i64) -> Result<Self> {
        check_fits(&cfg, teacher)?;
        let arch = arch_of(cfg.options.head);
        let init = crate::rng::seeded(seed, || arch.init(teacher, &cfg))?;
        Self::from_tensors(teacher, cfg, &init)
    }

    /// Loads an exported head directory (its kind's weights file + config.json, see `export`).
    pub fn load(dir: &Path, teacher: &Teacher) -> Result<Self> {
        // A training checkpoint (its state.json) or run (its checkpoints/) is not a head yet.
        ensure!(
            !dir.join("state.json").exists() && !dir.join("checkpoints").is_dir(),
            "{} is a training checkpoint or run, not an exported head: export it first with \
             `clover export --checkpoint {} --out HEAD_DIR`",
            dir.display(),
            dir.display()
        );
        let config_file = dir.join("config.json");
        let cfg = HeadConfig::from_export_json(&config_file)?;
        validate(&cfg, &config_file.display().to_string())?;
        let file = dir.join(arch_of(cfg.options.head).weights_file());
        let tensors = read_head_tensors(&file, &cfg)?;
        Self::from_tensors(teacher, cfg, &tensors)
    }

    /// Builds the head from named f32 tensors; every name of its kind's `trainable_shapes`
    /// must be present with its shape.
    pub fn from_tensors(
        teacher: &Teacher,
        cfg: HeadConfig,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        check_fits(&cfg, teacher)?;
        check_head_tensors(&cfg, tensors, "head tensors")?;
        let arch = arch_of(cfg.options.head);
        let lm_head = teacher.lm_head_weight().shallow_clone();
        let draft_vocab = match tensors.get(D2T) {
            Some(d2t) => Some(DraftVocab::from_d2t(&lm_head, d2t)?),
            None => None,
        };
        let frozen = FrozenParts {
            token_table: arch.token_table().of(teacher)?.shallow_clone(),
            final_norm: teacher.weight("model.norm.weight")?.shallow_clone(),
            decoder_layers: arch.decoder_layers(&cfg.options),
            lm_head,
        };
        let names: Vec<String> = arch
            .trainable_shapes(&cfg)
            .into_iter()
            .map(|x| x.0)
            .collect();
        let teacher_layers = arch.teacher_layers(&cfg.options, teacher.config.num_hidden_layers);
        let store = HeadStore::new(teacher, cfg, &names, tensors, frozen);
        Ok(DraftHead {
            arch,
            store,
            draft_vocab,
            teacher_layers,
        })
    }

    /// The teacher layers whose inputs (concatenated) the head reads in place of u, where it
    /// reads any (EAGLE-3): what `Teacher::forward_tapped` is asked for.
    pub fn teacher_layers(&self) -> Option<&[i64]> {
        self.teacher_layers.as_deref()
    }

    /// The head's architecture: its capabilities and kind-specific behaviour.
    pub fn arch(&self) -> &'static dyn HeadArch {
        self.arch
    }
    pub fn config(&self) -> &HeadConfig {
        self.store.config()
    }
    pub fn var_store(&self) -> &nn::VarStore {
        self.store.var_store()
    }
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        self.store.var_store_mut()
    }
    pub fn device(&self) -> Device {
        self.store.device()
    }
    pub fn compute_kind(&self) -> Kind {
        self.store.compute_kind()
    }
    /// See `HeadStore::to_kind`.
    pub fn to_kind(&mut self, kind: Kind) {
        self.store.to_kind(kind);
    }
    /// See `HeadStore::set_compute_kind`.
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.store.set_compute_kind(kind);
    }
    /// See `HeadStore::stream_kind`.
    pub fn stream_kind(&self) -> Kind {
        self.store.stream_kind()
    }

    /// Trainable parameter count.
    pub fn num_parameters(&self) -> i64 {
        self.store
            .var_store()
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    /// Token embeddings from the kind's frozen token table (G8; EAGLE: the teacher's
    /// embed_tokens).
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        self.store.embed(ids)
    }

    /// The teacher's post-norm features h = final_norm(u), in the stream's kind.
    pub fn post_norm(&self, u: &Tensor) -> Tensor {
        self.store.post_norm(u)
    }

    /// Depth 0: u = teacher pre-norm states [B,S,H], next_ids = x_{t+1} [B,S] (G4 shift done
    /// by the caller), positions [B,S]; mask as `Teacher::forward` (None = causal); optional
    /// draft KV cache. Returns (o0, the state depth 1 steps from).
    pub fn depth0(
        &self,
        u: &Tensor,
        next_ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> (Tensor, Tensor) {
        let rows = TokenRows {
            next_ids,
            positions,
            mask,
        };
        self.arch.depth0(&self.store, u, &rows, cache)
    }

    /// The step to depth 1: state [..,H], token ids [..] -> (o, new state).
    pub fn step(&self, state: &Tensor, token_ids: &Tensor) -> (Tensor, Tensor) {
        self.step_at(1, state, token_ids)
    }

    /// The step to depth `depth` >= 1 (`HeadArch::step`).
    pub fn step_at(&self, depth: i64, state: &Tensor, token_ids: &Tensor) -> (Tensor, Tensor) {
        self.arch.step(&self.store, depth, state, token_ids)
    }

    /// The attending forward of kinds whose depths >= 1 attend over the tree
    /// (`HeadArch::attends_over_tree`): features [B,S,H], their tokens, positions, mask, cache.
    pub fn tree_forward(
        &self,
        features: &Tensor,
        rows: &TokenRows,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.arch.tree_forward(&self.store, features, rows, cache)
    }

    /// Logits through the frozen teacher lm_head, in the lm_head's kind.
    pub fn logits(&self, o: &Tensor) -> Tensor {
        self.store.frozen_logits(o)
    }

    /// Logits of depth `depth`'s outputs over the teacher's ids: the kind's own projection
    /// where it has one, else the frozen lm_head; with a trained draft vocabulary, -inf
    /// outside it.
    pub fn logits_at(&self, depth: i64, o: &Tensor) -> Tensor {
        if let Some(own) = self.arch.own_logits(&self.store, depth, o) {
            // Over the draft vocabulary when the head has one (EAGLE-3's lm_head).
            return match &self.draft_vocab {
                Some(vocab) => vocab.scatter(&own),
                None => own,
            };
        }
        match &self.draft_vocab {
            Some(vocab) => vocab.logits(o),
            None => self.logits(o),
        }
    }

    /// The logits the training loss sees: `logits_at`, or with a trained draft vocabulary only
    /// its N columns (draft index i = teacher id `ids[i]`).
    pub fn loss_logits_at(&self, depth: i64, o: &Tensor) -> Tensor {
        if let Some(own) = self.arch.own_logits(&self.store, depth, o) {
            return own;
        }
        match &self.draft_vocab {
            Some(vocab) => vocab.draft_logits(o),
            None => self.logits_at(depth, o),
        }
    }

    /// The loss chunk this head can train with (`loss_chunk`, `training::loss`). The chunked
    /// loss sends the distillation gradient back through the depth outputs only, which is all a
    /// frozen lm_head needs; a head whose vocabulary projection trains runs unchunked (0), or
    /// the projection would never learn.
    pub fn loss_chunk(&self, configured: usize) -> usize {
        match self.arch.trains_vocab_projection() {
            true => 0,
            false => configured,
        }
    }

    /// Depths the training loss sees.
    pub fn trained_depths(&self) -> i64 {
        self.arch.trained_depths(&self.config().options)
    }

    /// The trained draft vocabulary, if the head has one.
    pub fn draft_vocab(&self) -> Option<&DraftVocab> {
        self.draft_vocab.as_ref()
    }

    /// Gives a new head (`draft_vocab = N` in its config) its vocabulary: N distinct teacher ids.
    pub fn set_draft_vocab(&mut self, ids: &[i64]) -> Result<()> {
        let configured = self.config().options.draft_vocab;
        ensure!(
            configured == Some(ids.len()),
            "a draft vocabulary of {} tokens for a head configured with draft_vocab = {configured:?}",
            ids.len(),
        );
        self.draft_vocab = Some(DraftVocab::new(self.store.lm_head_weight(), ids, 1)?);
        Ok(())
    }

    /// A vocabulary sliced out of this head's lm_head at inference (FR-Spec, `--draft-vocab`),
    /// at least `min_len` (the tree's top-k) tokens.
    pub fn slice_vocab(&self, ids: &[i64], min_len: usize) -> Result<DraftVocab> {
        // The same rule as the training key's (`HeadArch::check_options`).
        ensure!(
            self.arch.takes_draft_vocab(),
            "--draft-vocab works with Clover-2 heads; this head is {}",
            self.arch.kind().name()
        );
        if let Some(trained) = &self.draft_vocab {
            bail!(
                "this head was trained with a draft vocabulary of {} tokens and drafts from it \
                 already: leave out --draft-vocab",
                trained.len()
            );
        }
        DraftVocab::new(self.store.lm_head_weight(), ids, min_len)
    }

    /// The frozen lm_head weight [V,H] (shared with the teacher).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.store.lm_head_weight()
    }

    /// An empty draft KV cache for `batch` rows (the draft's own layers, in the stream's kind).
    pub fn new_cache(&self, batch: i64) -> KvCache {
        self.store.new_cache(batch)
    }

    /// Training forward, all depths teacher-forced (`HeadArch::depth_outputs`): depth i's
    /// outputs have T-i rows.
    pub fn depth_outputs(&self, u: &Tensor, next_ids: &Tensor) -> Vec<Tensor> {
        self.arch.depth_outputs(&self.store, u, next_ids)
    }

    /// The training forward with the kind's recipe noise (`HeadArch::training_outputs`).
    pub fn training_outputs(&self, u: &Tensor, next_ids: &Tensor, noise_seed: i64) -> Vec<Tensor> {
        self.arch
            .training_outputs(&self.store, u, next_ids, noise_seed)
    }

    /// The trainable tensors by reference name (shallow clones of the variables).
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        self.store.named_tensors()
    }

    /// What a checkpoint or an export stores: the trainable tensors and, with a trained draft
    /// vocabulary, its `d2t` offsets (EAGLE-3's convention).
    pub fn saved_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut all = self.named_tensors();
        if let Some(vocab) = &self.draft_vocab {
            all.insert(D2T.to_string(), vocab.d2t());
        }
        all
    }

    /// Copies values into the variables (same names and shapes; used by resume and init_from).
    /// A stored draft vocabulary must be this head's.
    pub fn load_tensors(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        check_head_tensors(self.config(), tensors, "loaded head tensors")?;
        if let Some(d2t) = tensors.get(D2T) {
            let same = |v: &DraftVocab| v.d2t() == d2t.to_kind(Kind::Int64).to_device(Device::Cpu);
            ensure!(
                self.draft_vocab.as_ref().is_some_and(same),
                "the stored head's draft vocabulary ({} tokens) is not this run's: the training \
                 data or draft_vocab changed",
                d2t.numel()
            );
        }
        let vars = self.named_tensors();
        tch::no_grad(|| -> Result<()> {
            for (name, mut var) in vars {
                let src = &tensors[&name];
                var.f_copy_(&src.to_kind(var.kind()).to_device(var.device()))
                    .with_context(|| format!("copying head tensor {name}"))?;
            }
            Ok(())
        })
    }
}

/// The head's config is valid for its kind and matches the teacher it is attached to.
fn check_fits(cfg: &HeadConfig, teacher: &Teacher) -> Result<()> {
    cfg.check_against(&teacher.config)?;
    validate(cfg, "draft head")
}

/// Fails loudly when a required head tensor is missing or misshapen.
pub fn check_head_tensors(
    cfg: &HeadConfig,
    tensors: &BTreeMap<String, Tensor>,
    what: &str,
) -> Result<()> {
    let mut problems = Vec::new();
    for (name, shape) in arch_of(cfg.options.head).trainable_shapes(cfg) {
        match tensors.get(&name) {
            None => problems.push(format!("missing {name}")),
            Some(t) if t.size() != shape => problems.push(format!(
                "{name}: shape {:?}, expected {:?}",
                t.size(),
                shape
            )),
            Some(_) => {}
        }
    }
    match (tensors.get(D2T), cfg.options.draft_vocab) {
        (Some(d2t), Some(n)) if d2t.size() != [n as i64] => problems.push(format!(
            "{D2T}: shape {:?}, expected [{n}] (draft_vocab = {n})",
            d2t.size()
        )),
        (Some(_), None) => problems.push(format!(
            "{D2T} is present but the config has no draft_vocab"
        )),
        _ => {}
    }
    if !problems.is_empty() {
        bail!("{what}: {}", problems.join("; "));
    }
    Ok(())
}

/// Reads the head's tensors from a safetensors file, checking names and shapes. The frozen
/// teacher copies an export writes (`frozen_names`) and the draft vocabulary's membership mask
/// are skipped; any other tensor the config does not describe (a third Augmenting-Block layer
/// under `num_layers = 2`, a depth Medusa's `num_heads` does not count) is refused, since it
/// means the config and the weights are of two different heads.
pub fn read_head_tensors(file: &Path, cfg: &HeadConfig) -> Result<BTreeMap<String, Tensor>> {
    let all =
        Tensor::read_safetensors(file).with_context(|| format!("reading {}", file.display()))?;
    let arch = arch_of(cfg.options.head);
    let mut wanted: std::collections::HashSet<String> = arch
        .trainable_shapes(cfg)
        .into_iter()
        .map(|x| x.0)
        .collect();
    let mut skipped: Vec<&str> = arch.frozen_names().to_vec();
    if let Some(n) = cfg.options.draft_vocab {
        ensure!(
            all.iter().any(|(name, _)| name == D2T),
            "{}: the head has draft_vocab = {n} but no {D2T} mapping",
            file.display()
        );
        wanted.insert(D2T.to_string());
        skipped.push(T2D);
    }
    let mut unused: Vec<&str> = all
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !wanted.contains(*n) && !skipped.contains(n))
        .collect();
    unused.sort();
    ensure!(
        unused.is_empty(),
        "{}: {} tensors are not part of the head its config.json describes ({} {}): {}",
        file.display(),
        unused.len(),
        cfg.options.head.name(),
        arch.described_size(&cfg.options),
        crate::checks::first_few(&unused)
    );
    let tensors: BTreeMap<String, Tensor> = all
        .into_iter()
        .filter(|(n, _)| wanted.contains(n))
        .collect();
    check_head_tensors(cfg, &tensors, &file.display().to_string())?;
    check_finite_tensors(&tensors).with_context(|| format!("{}", file.display()))?;
    Ok(tensors)
}

/// Load an exported draft head for inference next to `teacher`, in the teacher's dtype (the
/// reference casts the draft to the base dtype).
pub fn load_head(dir: &std::path::Path, teacher: &Teacher) -> Result<DraftHead> {
    let mut head = DraftHead::load(dir, teacher)
        .with_context(|| format!("loading draft head {}", dir.display()))?;
    if teacher.kind() != Kind::Float {
        head.to_kind(teacher.kind());
    }
    Ok(head)
}
