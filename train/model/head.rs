//! The Clover-2 draft head (docs/clover2.md §1): Attention-Decoder cells, the 2-layer Augmenting Block,
//! `clover_norm`, FC0 / the weight-tied regressive FC with `clover_head_norm`, the frozen teacher
//! lm_head and the lm_head-tied frozen embedding table.
//!
//! Trainable parameters live in a `tch::nn::VarStore` under the reference's state-dict names
//! (docs/clover2.md §1.4) so that export is a plain rename-free write. They are f32 master weights.
//! Training under bf16 is autocast's policy (`set_compute_kind`): weight matrices are cast to bf16
//! on use and every matrix product runs in bf16, while the residual stream, norms (with their f32
//! weights), biases' additions, the gates and the loss stay f32. For inference the whole store can
//! be cast with `to_kind`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use tch::{nn, Device, Kind, Tensor};

use crate::model::config::LlamaConfig;
use crate::model::draft_vocab::{DraftVocab, D2T, T2D};
use crate::model::finite::check_finite_tensors;
use crate::model::head_config::{HeadConfig, HeadKind};
use crate::model::layers::{linear, linear_cast, rms_norm, DecoderLayer, KvCache, Rope};
use crate::model::teacher::Teacher;

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

/// One Attention-Decoder cell (docs/clover2.md §1.2): per-head cosine gate of q = W_q RMSNorm(x) + b_q against
/// k = W_k y + b_k, scaling v = W_v y + b_v, plus the residual. No softmax, no output projection.
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
    let lead: Vec<i64> = x.size()[..x.dim() - 1].to_vec();
    let mut split = lead.clone();
    split.extend([num_heads, d]);
    let qh = linear_cast(&rms_norm(x, norm_w, eps), q.0, Some(q.1)).reshape(split.as_slice());
    let kh = linear_cast(y, k.0, Some(k.1)).reshape(split.as_slice());
    let vh = linear_cast(y, v.0, Some(v.1)).reshape(split.as_slice());
    // torch.cosine_similarity with eps = rms_norm_eps, as the reference (G8).
    let gate = Tensor::cosine_similarity(&qh, &kh, -1, eps).unsqueeze(-1);
    x + (gate * vh).reshape(x.size().as_slice())
}

/// The Clover-2 draft head attached to a frozen teacher.
pub struct DraftHead {
    cfg: HeadConfig,
    draft_llama: LlamaConfig,
    vs: nn::VarStore,
    /// The teacher's lm_head weight [V,H]: the same tensor (no copy). It is also the draft's token
    /// embedding table (row v = embedding of token v, G8). Frozen.
    lm_head: Tensor,
    /// The draft's token-embedding table: the lm_head (Clover-2, G8) or the teacher's own
    /// `embed_tokens` (EAGLE-1). Frozen.
    embed_table: Tensor,
    /// The teacher's final RMSNorm weight: EAGLE-1 and Medusa read post-norm features h. Frozen.
    final_norm: Tensor,
    rope: Rope,
    compute_kind: Kind,
    /// The trained draft vocabulary (`draft_vocab = N`, EAGLE-3): the head's logits cover only
    /// these tokens. None: the full vocabulary.
    draft_vocab: Option<DraftVocab>,
    /// Shallow clones of the store's variables by name (they share storage and autograd with it).
    vars: BTreeMap<String, Tensor>,
}

impl DraftHead {
    /// A head with the reference initialisation (§1.1) from the teacher, seeded.
    pub fn new(teacher: &Teacher, cfg: HeadConfig, seed: i64) -> Result<Self> {
        cfg.check_against(&teacher.config)?;
        let init = crate::rng::seeded(seed, || match cfg.options.head {
            HeadKind::Clover2 => reference_init(teacher, &cfg),
            HeadKind::Eagle1 => crate::model::eagle::init(&cfg),
            HeadKind::Medusa => crate::model::medusa::init(teacher, &cfg),
        })?;
        Self::from_tensors(teacher, cfg, &init)
    }

    /// Loads an exported head directory (model.safetensors + config.json, see `export`).
    pub fn load(dir: &Path, teacher: &Teacher) -> Result<Self> {
        // A training checkpoint (its state.json) or run (its checkpoints/) is not a head yet.
        ensure!(
            !dir.join("state.json").exists() && !dir.join("checkpoints").is_dir(),
            "{} is a training checkpoint or run, not an exported head: export it first with \
             `clover export --checkpoint {} --out HEAD_DIR`",
            dir.display(),
            dir.display()
        );
        let cfg = HeadConfig::from_export_json(&dir.join("config.json"))?;
        cfg.check_against(&teacher.config)?;
        let file = dir.join(crate::model::head_config::head_weights_file(
            cfg.options.head,
        ));
        let tensors = read_head_tensors(&file, &cfg)?;
        Self::from_tensors(teacher, cfg, &tensors)
    }

    /// Builds the store from named f32 tensors; every name of `trainable_shapes` must be present
    /// with its shape.
    pub fn from_tensors(
        teacher: &Teacher,
        cfg: HeadConfig,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        cfg.check_against(&teacher.config)?;
        check_head_tensors(&cfg, tensors, "head tensors")?;
        let device = teacher.device();
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        for (name, _) in cfg.trainable_shapes() {
            let t = tensors[&name].to_kind(Kind::Float).to_device(device);
            add_named_var(&root, &name, &t);
        }
        let draft_llama = cfg.draft_llama_config(&teacher.config);
        let rope = Rope::new(&draft_llama, device);
        let lm_head = teacher.lm_head_weight().shallow_clone();
        let embed_table = match cfg.options.head {
            HeadKind::Eagle1 => teacher.weight("model.embed_tokens.weight")?.shallow_clone(),
            HeadKind::Clover2 | HeadKind::Medusa => lm_head.shallow_clone(),
        };
        let draft_vocab = match tensors.get(D2T) {
            Some(d2t) => Some(DraftVocab::from_d2t(&lm_head, d2t)?),
            None => None,
        };
        Ok(DraftHead {
            draft_vocab,
            final_norm: teacher.weight("model.norm.weight")?.shallow_clone(),
            cfg,
            draft_llama,
            vs,
            lm_head,
            embed_table,
            rope,
            compute_kind: Kind::Float,
            vars: BTreeMap::new(),
        }
        .with_var_cache())
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

    fn with_var_cache(mut self) -> Self {
        self.vars = self.vs.variables().into_iter().collect();
        self
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

    /// Trainable parameter count.
    pub fn num_parameters(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    /// A trainable tensor by reference name: weight matrices cast to the compute kind (they
    /// enter matrix products), vectors (norm weights, biases) as the master copy.
    pub(crate) fn w(&self, name: &str) -> Result<Tensor> {
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

    pub(crate) fn wu(&self, name: &str) -> Tensor {
        // Names come from `trainable_shapes`, all created in `from_tensors`: absence is a bug.
        self.w(name).unwrap_or_else(|e| panic!("draft head: {e}"))
    }

    /// Token embeddings: rows of the frozen lm_head weight (G8; EAGLE-1: the teacher's
    /// embed_tokens).
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        let flat = ids.reshape([-1]);
        let mut shape = ids.size();
        shape.push(self.cfg.hidden_size);
        self.embed_table
            .index_select(0, &flat)
            .reshape(shape.as_slice())
            .to_kind(self.stream_kind())
    }

    fn cell(&self, prefix: &str, x: &Tensor, y: &Tensor) -> Tensor {
        let p = |s: &str| self.wu(&format!("{prefix}.{s}"));
        let (qw, qb, kw, kb, vw, vb) = (
            p("q.weight"),
            p("q.bias"),
            p("k.weight"),
            p("k.bias"),
            p("v.weight"),
            p("v.bias"),
        );
        attention_decoder(
            x,
            y,
            &p("input_layernorm.weight"),
            (&qw, &qb),
            (&kw, &kb),
            (&vw, &vb),
            self.cfg.num_attention_heads,
            self.cfg.rms_norm_eps,
        )
    }

    fn norm(&self, name: &str, x: &Tensor) -> Tensor {
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

    /// The draft's rotary embedding.
    pub(crate) fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The draft's LLaMA shape (layer count and RoPE of its own decoder layers).
    pub(crate) fn draft_llama(&self) -> &LlamaConfig {
        &self.draft_llama
    }

    /// The Augmenting-Block layers, rebuilt per call from the (possibly cast) trainable weights so
    /// autograd reaches the master variables.
    fn augmenting_layers(&self) -> Vec<DecoderLayer> {
        (0..self.cfg.options.num_layers)
            .map(|l| {
                let get = |rel: &str| self.w(&format!("layers.{l}.{rel}"));
                DecoderLayer::from_weights(&self.draft_llama, &get)
                    .unwrap_or_else(|e| panic!("draft layer {l}: {e}"))
            })
            .collect()
    }

    /// Depth 0 (§1.3): u = teacher pre-norm states [B,S,H], next_ids = x_{t+1} [B,S] (G4 shift done
    /// by the caller), positions [B,S]; mask as `Teacher::forward` (None = causal); optional draft
    /// KV cache (num_layers layers). Returns (o0 after clover_head_norm, s0 = clover_norm(block)).
    /// EAGLE-1 and Medusa: see `model::eagle::depth0`, `model::medusa::depth0`.
    pub fn depth0(
        &self,
        u: &Tensor,
        next_ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> (Tensor, Tensor) {
        match self.cfg.options.head {
            HeadKind::Clover2 => self.clover_depth0(u, next_ids, positions, mask, cache),
            HeadKind::Eagle1 => {
                crate::model::eagle::depth0(self, u, next_ids, positions, mask, cache)
            }
            HeadKind::Medusa => crate::model::medusa::depth0(self, u),
        }
    }

    fn clover_depth0(
        &self,
        u: &Tensor,
        next_ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> (Tensor, Tensor) {
        let u = u.to_kind(self.stream_kind());
        let a = self.cell("clover_head_mlp_rnn", &u, &self.embed(next_ids));
        let mut z = a;
        let angles = self.rope.cos_sin(positions);
        for (l, layer) in self.augmenting_layers().iter().enumerate() {
            z = layer.forward(&z, &angles, mask, cache.as_deref_mut(), l);
        }
        if let Some(c) = cache {
            c.advance(next_ids.size()[1]);
        }
        let s0 = self.norm("clover_norm.weight", &z);
        let fc0 = linear_cast(
            &s0,
            &self.wu("clover_head_mlp.weight"),
            Some(&self.wu("clover_head_mlp.bias")),
        );
        (self.norm("clover_head_norm.weight", &fc0), s0)
    }

    /// Depth k >= 1 RNN step (weight-tied): state [..,H], token ids [..] -> (o, s) where s is the
    /// new carried state (the cell output, not the FC output: G7).
    pub fn step(&self, state: &Tensor, token_ids: &Tensor) -> (Tensor, Tensor) {
        self.step_at(1, state, token_ids)
    }

    /// The step to depth `depth` >= 1: Clover-2's weight-tied step (any depth), Medusa's block
    /// `depth` on the carried h, or EAGLE-1's layer on each row alone (no context: the tree
    /// drafter in `decode::eagle_drafter` gives it the context; see docs/heads.md §1.3).
    pub fn step_at(&self, depth: i64, state: &Tensor, token_ids: &Tensor) -> (Tensor, Tensor) {
        match self.cfg.options.head {
            HeadKind::Clover2 => self.clover_step(state, token_ids),
            HeadKind::Eagle1 => crate::model::eagle::step_alone(self, state, token_ids),
            HeadKind::Medusa => crate::model::medusa::step(self, depth, state),
        }
    }

    fn clover_step(&self, state: &Tensor, token_ids: &Tensor) -> (Tensor, Tensor) {
        let state = state.to_kind(self.stream_kind());
        let emb = self.embed(token_ids);
        // The regressive-connection ablation: depths >= 1 do not see the chosen token.
        let emb = match self.cfg.options.regressive_connection {
            true => emb,
            false => emb.zeros_like(),
        };
        let s = self.cell("clover_head_mlp_rnn2", &state, &emb);
        let fc_in = Tensor::cat(&[&s, &emb], -1);
        let fc = linear_cast(
            &fc_in,
            &self.wu("clover_head_mlp2.weight"),
            Some(&self.wu("clover_head_mlp2.bias")),
        );
        (self.norm("clover_head_norm.weight", &fc), s)
    }

    /// Logits through the frozen teacher lm_head, in the lm_head's kind.
    pub fn logits(&self, o: &Tensor) -> Tensor {
        linear(&o.to_kind(self.lm_head.kind()), &self.lm_head, None)
    }

    /// Logits of depth `depth`'s outputs over the teacher's ids: the frozen lm_head (Clover-2,
    /// EAGLE-1) or Medusa's own trainable projection of that depth. With a trained draft
    /// vocabulary, -inf outside it.
    pub fn logits_at(&self, depth: i64, o: &Tensor) -> Tensor {
        match (&self.draft_vocab, self.cfg.options.head) {
            (_, HeadKind::Medusa) => crate::model::medusa::logits(self, depth, o),
            (Some(vocab), _) => vocab.logits(o),
            (None, HeadKind::Clover2 | HeadKind::Eagle1) => self.logits(o),
        }
    }

    /// The logits the training loss sees: `logits_at`, or with a trained draft vocabulary only
    /// its N columns (draft index i = teacher id `ids[i]`).
    pub fn loss_logits_at(&self, depth: i64, o: &Tensor) -> Tensor {
        match &self.draft_vocab {
            Some(vocab) => vocab.draft_logits(o),
            None => self.logits_at(depth, o),
        }
    }

    /// The loss chunk this head can train with (`loss_chunk`, `training::loss`). The chunked
    /// loss sends the distillation gradient back through the depth outputs only, which is all a
    /// frozen lm_head needs; Medusa's vocabulary projections are trainable, so its loss runs
    /// unchunked (0), or they would never learn.
    pub fn loss_chunk(&self, configured: usize) -> usize {
        match self.cfg.options.head {
            HeadKind::Medusa => 0,
            HeadKind::Clover2 | HeadKind::Eagle1 => configured,
        }
    }

    /// The trained draft vocabulary, if the head has one.
    pub fn draft_vocab(&self) -> Option<&DraftVocab> {
        self.draft_vocab.as_ref()
    }

    /// Gives a new head (`draft_vocab = N` in its config) its vocabulary: N distinct teacher ids.
    pub fn set_draft_vocab(&mut self, ids: &[i64]) -> Result<()> {
        ensure!(
            self.cfg.options.draft_vocab == Some(ids.len()),
            "a draft vocabulary of {} tokens for a head configured with draft_vocab = {:?}",
            ids.len(),
            self.cfg.options.draft_vocab
        );
        self.draft_vocab = Some(DraftVocab::new(&self.lm_head, ids, 1)?);
        Ok(())
    }

    /// A vocabulary sliced out of this head's lm_head at inference (FR-Spec, `--draft-vocab`),
    /// at least `min_len` (the tree's top-k) tokens.
    pub fn slice_vocab(&self, ids: &[i64], min_len: usize) -> Result<DraftVocab> {
        // The same rule as the training key's (`HeadOptions::check`).
        ensure!(
            self.cfg.options.head == HeadKind::Clover2,
            "--draft-vocab works with Clover-2 heads; this head is {}",
            self.cfg.options.head.name()
        );
        if let Some(trained) = &self.draft_vocab {
            bail!(
                "this head was trained with a draft vocabulary of {} tokens and drafts from it \
                 already: leave out --draft-vocab",
                trained.len()
            );
        }
        DraftVocab::new(&self.lm_head, ids, min_len)
    }

    /// The frozen lm_head weight [V,H] (shared with the teacher).
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    /// An empty draft KV cache for `batch` rows (num_layers layers, in the stream's kind).
    pub fn new_cache(&self, batch: i64) -> KvCache {
        KvCache::new(&self.draft_llama, batch, self.device(), self.stream_kind())
    }

    /// Training forward, all depths teacher-forced as the reference's `get_all_head` (§1.3, G5):
    /// depth i gets state[:, :T-i] and emb[:, i:]; returns o_i with T-i rows each.
    /// EAGLE-1 returns its one trained depth, Medusa its `num_depths` blocks on h[:, :T-i].
    pub fn depth_outputs(
        &self,
        u: &Tensor,
        next_ids: &Tensor,
        mask: Option<&Tensor>,
    ) -> Vec<Tensor> {
        let (b, t) = (next_ids.size()[0], next_ids.size()[1]);
        let positions = Tensor::arange(t, (Kind::Int64, self.device()))
            .unsqueeze(0)
            .expand([b, t], true);
        match self.cfg.options.head {
            HeadKind::Clover2 => {}
            HeadKind::Eagle1 => {
                return vec![self.depth0(u, next_ids, &positions, mask, None).0];
            }
            HeadKind::Medusa => return crate::model::medusa::depth_outputs(self, u),
        }
        let (o0, mut state) = self.depth0(u, next_ids, &positions, mask, None);
        let mut outs = vec![o0];
        for i in 1..self.cfg.options.num_depths.min(t) {
            let tok = next_ids.narrow(1, i, t - i);
            let (o, s) = self.step(&state.narrow(1, 0, t - i), &tok);
            outs.push(o);
            state = s;
        }
        outs
    }

    /// The training forward with the head's recipe noise: EAGLE-1's uniform noise on its input
    /// features, drawn from its own generator seeded with `noise_seed` (so a resumed run draws
    /// the same); the others train on `depth_outputs` as they are.
    pub fn training_outputs(&self, u: &Tensor, next_ids: &Tensor, noise_seed: i64) -> Vec<Tensor> {
        let amplitude = self.cfg.options.input_noise();
        match self.cfg.options.head {
            HeadKind::Eagle1 if amplitude > 0.0 => {
                vec![crate::model::eagle::noisy_forward(
                    self, u, next_ids, amplitude, noise_seed,
                )]
            }
            _ => self.depth_outputs(u, next_ids, None),
        }
    }

    /// The trainable tensors by reference name (shallow clones of the variables).
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
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
        check_head_tensors(&self.cfg, tensors, "loaded head tensors")?;
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
    for (name, _) in cfg.trainable_shapes() {
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
    for cell in ["clover_head_mlp_rnn", "clover_head_mlp_rnn2"] {
        out.insert(
            format!("{cell}.input_layernorm.weight"),
            Tensor::ones([h], (Kind::Float, Device::Cpu)),
        );
        out.insert(format!("{cell}.q.weight"), eye_plus_uniform(h));
        out.insert(format!("{cell}.k.weight"), eye_plus_uniform(h));
        out.insert(format!("{cell}.v.weight"), small_uniform(&[h, h]));
        for p in ["q", "k", "v"] {
            out.insert(
                format!("{cell}.{p}.bias"),
                Tensor::zeros([h], (Kind::Float, Device::Cpu)),
            );
        }
    }
    out.insert("clover_head_mlp.weight".into(), eye_plus_uniform(h));
    out.insert(
        "clover_head_mlp.bias".into(),
        Tensor::zeros([h], (Kind::Float, Device::Cpu)),
    );
    out.insert("clover_head_mlp2.weight".into(), part_eye_uniform(h));
    out.insert(
        "clover_head_mlp2.bias".into(),
        Tensor::zeros([h], (Kind::Float, Device::Cpu)),
    );
    Ok(out)
}

/// Fails loudly when a required head tensor is missing or misshapen.
pub fn check_head_tensors(
    cfg: &HeadConfig,
    tensors: &BTreeMap<String, Tensor>,
    what: &str,
) -> Result<()> {
    let mut problems = Vec::new();
    for (name, shape) in cfg.trainable_shapes() {
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
    let mut wanted: std::collections::HashSet<String> =
        cfg.trainable_shapes().into_iter().map(|x| x.0).collect();
    let mut skipped: Vec<&str> = crate::model::head_config::frozen_names(cfg.options.head).to_vec();
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
        described_size(cfg),
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

/// The config keys that decide which tensors a head has, for an error about them.
fn described_size(cfg: &HeadConfig) -> String {
    match cfg.options.head {
        HeadKind::Clover2 => format!("with num_layers = {}", cfg.options.num_layers),
        HeadKind::Eagle1 => "with one decoder layer".into(),
        HeadKind::Medusa => format!("with num_heads = {}", cfg.options.num_depths),
    }
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
