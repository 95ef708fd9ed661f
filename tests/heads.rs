//! The EAGLE-1 and Medusa-1 baselines (docs/heads.md) and Clover-2's ablation switches: forwards
//! and losses against hand-computed cases, export round trips, EAGLE's tree attention against
//! plain causal passes, and greedy speculative output equal to plain decoding for every kind.
use clover::training::run_dir::Start;
use std::collections::BTreeMap;

use crate::common::whole_batch_loss;
use crate::common::{scratch_dir, tiny_teacher};
use crate::speculative::{load, plain_greedy, tiny_llama};
use clover::decode::drafter::Drafter;
use clover::decode::drafter::TreeAttentionDrafter;
use clover::decode::sampling::Sampling;
use clover::decode::speculative::generate_speculative;
use clover::decode::tree::Tree;
use clover::model::arch::HeadArch;
use clover::model::head::DraftHead;
use clover::model::head_config::{HeadConfig, HeadKind, HeadOptions};
use clover::model::teacher::Teacher;
use clover::training::export::export_head;
use clover::training::loss::LossWeights;
use tch::{Device, Kind, Tensor};

fn head_of(teacher: &Teacher, kind: HeadKind, depths: i64, seed: i64) -> DraftHead {
    let mut cfg = HeadConfig::from_teacher(&teacher.config);
    cfg.options.head = kind;
    cfg.options.num_depths = depths;
    DraftHead::new(teacher, cfg, seed).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// The head's tensors with `edit` applied, rebuilt into a head.
fn edited(
    teacher: &Teacher,
    head: &DraftHead,
    edit: impl Fn(&str, &Tensor) -> Tensor,
) -> DraftHead {
    let tensors: BTreeMap<String, Tensor> = head
        .named_tensors()
        .iter()
        .map(|(n, t)| (n.clone(), edit(n, &t.detach().copy())))
        .collect();
    DraftHead::from_tensors(teacher, head.config().clone(), &tensors).unwrap()
}

fn inputs(t: i64, seed: i64) -> (Tensor, Tensor) {
    clover::rng::seeded(seed, || {
        let u = Tensor::randn([1, t, 64], (Kind::Float, Device::Cpu));
        let ids = Tensor::randint(90, [1, t], (Kind::Int64, Device::Cpu));
        (u, ids)
    })
}

/// EAGLE-1 with its decoder layer silenced (attention and MLP output projections zero, so the
/// layer is the identity) and fc = [I | 2I], bias b: the output must be E[x_{t+1}] + 2·h_t + b
/// with E the teacher's embed_tokens (the fixture's lm_head is untied, so a wrong table shows)
/// and h = final_norm(u).
#[test]
fn eagle1_forward_by_hand() {
    let teacher = tiny_teacher(Kind::Float);
    let base = head_of(&teacher, HeadKind::Eagle1, 1, 3);
    let bias = Tensor::linspace(-1.0, 1.0, 64, (Kind::Float, Device::Cpu));
    let head = edited(&teacher, &base, |name, t| match name {
        "fc.weight" => {
            let eye = Tensor::eye(64, (Kind::Float, Device::Cpu));
            Tensor::cat(&[&eye, &(&eye * 2.0)], 1)
        }
        "fc.bias" => bias.copy(),
        n if n.ends_with("o_proj.weight") || n.ends_with("down_proj.weight") => t.zeros_like(),
        _ => t.shallow_clone(),
    });
    let (u, next) = inputs(6, 11);
    let outs = tch::no_grad(|| head.depth_outputs(&u, &next));
    assert_eq!(outs.len(), 1, "EAGLE-1 trains one depth");
    let emb = teacher
        .weight("model.embed_tokens.weight")
        .unwrap()
        .index_select(0, &next.reshape([-1]))
        .view([1, 6, 64]);
    let want = emb + teacher.final_norm(&u) * 2.0 + &bias;
    // f32: a handful of roundings on values of size ~3: far below 1e-5.
    assert!(max_abs(&outs[0], &want) < 1e-5);
    // Its logits are the frozen lm_head's.
    let logits = head.logits_at(0, &outs[0]);
    assert!(max_abs(&logits, &teacher.lm_head(&outs[0])) < 1e-5);
}

/// EAGLE-1's layer 0 has no input norm and its attention is causal: changing a later row never
/// changes an earlier row's output, and the state dict has no `layers.0.input_layernorm`.
#[test]
fn eagle1_is_causal_and_has_eagle_key_names() {
    let teacher = tiny_teacher(Kind::Float);
    let head = head_of(&teacher, HeadKind::Eagle1, 1, 4);
    let names: Vec<String> = head.named_tensors().into_keys().collect();
    assert!(names.contains(&"fc.weight".to_string()) && names.contains(&"fc.bias".to_string()));
    assert!(names.contains(&"layers.0.post_attention_layernorm.weight".to_string()));
    assert!(!names.iter().any(|n| n.contains("input_layernorm")));
    assert_eq!(names.len(), 2 + 8);
    let (u, next) = inputs(5, 12);
    let u2 = u.copy();
    let _ = u2.narrow(1, 4, 1).fill_(3.0);
    let (a, b) = tch::no_grad(|| {
        (
            head.depth_outputs(&u, &next).remove(0),
            head.depth_outputs(&u2, &next).remove(0),
        )
    });
    assert!(max_abs(&a.narrow(1, 0, 4), &b.narrow(1, 0, 4)) < 1e-6);
    assert!(max_abs(&a.narrow(1, 4, 1), &b.narrow(1, 4, 1)) > 1e-3);
}

/// EAGLE-1's training noise: U(-a/2, a/2)·512/T with a = 0.2, seeded, on the input features only.
#[test]
fn eagle1_training_noise_is_eagles_uniform_and_seeded() {
    let noise = clover::model::eagle1::input_noise(&[2, 64, 8], 0.2, 7);
    let bound = 0.2 * 512.0 / 64.0 / 2.0; // 0.8
    let (lo, hi) = (noise.min().double_value(&[]), noise.max().double_value(&[]));
    assert!(lo >= -bound && hi <= bound, "noise in [{lo}, {hi}]");
    // 1024 uniform draws on [-0.8, 0.8]: the extremes come within 1% of the bounds with
    // probability 1 - 2·0.99^1024 > 0.9999.
    assert!(lo < -0.99 * bound && hi > 0.99 * bound);
    assert!(
        max_abs(
            &noise,
            &clover::model::eagle1::input_noise(&[2, 64, 8], 0.2, 7)
        ) == 0.0
    );
    let teacher = tiny_teacher(Kind::Float);
    let eagle = head_of(&teacher, HeadKind::Eagle1, 1, 5);
    let clover2 = head_of(&teacher, HeadKind::Clover2, 2, 5);
    let (u, next) = inputs(6, 13);
    tch::no_grad(|| {
        let noisy = eagle.training_outputs(&u, &next, 1);
        let clean = eagle.depth_outputs(&u, &next);
        assert!(max_abs(&noisy[0], &clean[0]) > 1e-3);
        let same = clover2.training_outputs(&u, &next, 1);
        for (a, b) in same.iter().zip(clover2.depth_outputs(&u, &next)) {
            assert_eq!(max_abs(a, &b), 0.0, "Clover-2 trains without noise");
        }
    });
}

/// Medusa with block weight W = 0 and bias b: head k's output is h + SiLU(b) on h[:, :T-k], and
/// its logits come from its own projection (here (k+1)·lm_head), not the shared lm_head.
#[test]
fn medusa_forward_by_hand() {
    let teacher = tiny_teacher(Kind::Float);
    let base = head_of(&teacher, HeadKind::Medusa, 3, 6);
    let bias = Tensor::linspace(-2.0, 2.0, 64, (Kind::Float, Device::Cpu));
    let head = edited(&teacher, &base, |name, t| {
        let k: f64 = name[..1].parse().unwrap();
        if name.ends_with(".0.linear.weight") {
            t.zeros_like()
        } else if name.ends_with(".0.linear.bias") {
            bias.copy()
        } else {
            teacher.lm_head_weight() * (k + 1.0)
        }
    });
    let (u, next) = inputs(6, 14);
    let outs = tch::no_grad(|| head.depth_outputs(&u, &next));
    assert_eq!(outs.len(), 3);
    let h = teacher.final_norm(&u);
    // SiLU(b) = b·sigmoid(b), by hand.
    let silu = &bias * bias.sigmoid();
    for (k, o) in outs.iter().enumerate() {
        let k = k as i64;
        assert_eq!(o.size(), [1, 6 - k, 64]);
        let want = h.narrow(1, 0, 6 - k) + &silu;
        assert!(max_abs(o, &want) < 1e-5);
        let logits = head.logits_at(k, o);
        let want = teacher.lm_head(&want) * (k + 1) as f64;
        assert!(max_abs(&logits, &want) < 1e-4 * (k + 1) as f64);
    }
    // Reference init: zero block weights, projections copied from the lm_head.
    let init = base.named_tensors();
    assert_eq!(
        init["1.0.linear.weight"]
            .abs()
            .sum(Kind::Float)
            .double_value(&[]),
        0.0
    );
    assert_eq!(max_abs(&init["2.1.weight"], teacher.lm_head_weight()), 0.0);
}

/// The loss weights each head trains with, and the loss they give: EAGLE-1 1·regression +
/// 0.1·distillation on its one depth; Medusa distillation only, 0.8^k by its config; Clover-2's
/// reference 10 / 1 / 0.7^k. Checked on a real batch: each depth's loss is the weighted sum of
/// its own two terms.
#[test]
fn loss_weights_per_head_and_the_loss_they_give() {
    let teacher = tiny_teacher(Kind::Float);
    let (u, next) = inputs(7, 15);
    let mask = Tensor::from_slice(&[0f32, 1., 1., 1., 1., 1., 0.]).view([1, 7]);
    for (kind, depths, v_w, p_w, n_out) in [
        (HeadKind::Clover2, 3, 10.0, 1.0, 3),
        (HeadKind::Eagle1, 3, 1.0, 0.1, 1),
        (HeadKind::Medusa, 3, 0.0, 1.0, 3),
    ] {
        let head = head_of(&teacher, kind, depths, 8);
        let w = LossWeights::reference(head.config());
        assert_eq!((w.v_w, w.p_w), (v_w, p_w), "{kind:?}");
        let outs = tch::no_grad(|| head.depth_outputs(&u, &next));
        assert_eq!(outs.len(), n_out);
        let logits = |i: usize, o: &Tensor| head.logits_at(i as i64, o);
        let parts = whole_batch_loss(&teacher, (&u, &mask), &outs, &logits, &w, 0, None);
        for (i, d) in parts.depths.iter().enumerate() {
            let want = (v_w * d.vloss + p_w * d.ploss) * 0.7f64.powi(i as i32);
            // f64 sums of three f32 values of size ~10: 1e-5 relative is generous.
            assert!(
                (d.loss - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{kind:?} depth {i}"
            );
        }
        // Medusa distills against the teacher: a perfect copy of the teacher's head at depth 0
        // would score the teacher's entropy; here it must at least be finite and positive.
        assert!(parts.depths[0].ploss.is_finite() && parts.depths[0].ploss > 0.0);
    }
}

/// Export then load gives the same logits, with each repository's file and key names.
#[test]
fn export_then_load_round_trip_for_eagle1_and_medusa() {
    let teacher = tiny_teacher(Kind::Float);
    let dir = scratch_dir("heads", "export");
    let teacher_config = crate::common::fixture("tiny-llama-untied").join("config.json");
    for (kind, file, key) in [
        (HeadKind::Eagle1, "model.safetensors", "fc.weight"),
        (HeadKind::Medusa, "medusa_lm_head.safetensors", "4.1.weight"),
    ] {
        let head = head_of(&teacher, kind, 5, 9);
        // Move off the init so a reload of the init would show.
        let head = edited(&teacher, &head, |_, t| t + 0.01);
        let out = dir.join(kind.name());
        let frozen = teacher.weight("model.embed_tokens.weight").unwrap();
        let frozen = (kind == HeadKind::Eagle1).then_some(frozen);
        export_head(
            head.config(),
            &head.named_tensors(),
            &teacher_config,
            frozen,
            &out,
        )
        .unwrap();
        let keys: Vec<String> = Tensor::read_safetensors(out.join(file))
            .unwrap()
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert!(keys.iter().any(|k| k == key), "{kind:?}: {key} in {file}");
        if kind == HeadKind::Eagle1 {
            assert!(keys.iter().any(|k| k == "embed_tokens.weight"));
        }
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        match kind {
            HeadKind::Eagle1 => assert_eq!(json["bias"], true),
            _ => assert_eq!(json["medusa_num_heads"], 5),
        }
        let back = DraftHead::load(&out, &teacher).unwrap();
        assert_eq!(back.config(), head.config());
        let (u, next) = inputs(5, 16);
        tch::no_grad(|| {
            for (a, b) in head
                .depth_outputs(&u, &next)
                .iter()
                .zip(back.depth_outputs(&u, &next))
            {
                assert_eq!(max_abs(a, &b), 0.0, "{kind:?}");
            }
        });
    }
}

/// EAGLE's tree attention: every node's draft equals a plain causal pass over the committed
/// prefix followed by that node's own chain (its siblings and cousins invisible). Two siblings
/// under the root and a grandchild under the second are drafted and each is recomputed.
#[test]
fn eagle_tree_drafting_equals_causal_passes_along_each_path() {
    let teacher = tiny_teacher(Kind::Float);
    let head = head_of(&teacher, HeadKind::Eagle1, 1, 10);
    let (u, next) = inputs(6, 17);
    tch::no_grad(|| {
        let mut drafter = TreeAttentionDrafter::new(&head);
        drafter.reset();
        let (logits0, row0) = drafter.extend(&u, &next).unwrap();
        let (y1, y2, y3) = (7i64, 9i64, 13i64);
        let parents = Tensor::cat(&[&row0, &row0], 0);
        let (l1, rows1) = drafter
            .step(&parents, &Tensor::from_slice(&[y1, y2]))
            .unwrap();
        let (l2, _) = drafter
            .step(&rows1.narrow(0, 1, 1), &Tensor::from_slice(&[y3]))
            .unwrap();
        // Recompute: a causal pass over the prefix, then feed predicted features along a chain.
        let pos = |n: i64| Tensor::arange(n, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let (f, _) = head.depth0(&u, &next, &pos(6), None, None);
        let f_last = f.narrow(1, 5, 1);
        assert!(max_abs(&logits0, &head.logits(&f_last.squeeze_dim(1))) < 1e-4);
        let h = head.post_norm(&u);
        let chain = |feats: &[&Tensor], toks: &[i64]| {
            let x = Tensor::cat(
                &[h.shallow_clone()]
                    .into_iter()
                    .chain(feats.iter().map(|t| t.shallow_clone()))
                    .collect::<Vec<_>>(),
                1,
            );
            let mut ids: Vec<i64> = Vec::try_from(next.reshape([-1])).unwrap();
            ids.extend_from_slice(toks);
            let n = ids.len() as i64;
            let ids = Tensor::from_slice(&ids).view([1, n]);
            let rows = clover::model::arch::TokenRows {
                next_ids: &ids,
                positions: &pos(n),
                mask: None,
            };
            head.tree_forward(&x, &rows, None).unwrap().select(1, n - 1)
        };
        let f_y1 = chain(&[&f_last], &[y1]);
        let f_y2 = chain(&[&f_last], &[y2]);
        let f_y3 = chain(&[&f_last, &f_y2.unsqueeze(1)], &[y2, y3]);
        // f32 paths over 8 positions, hidden 64, one layer: a few 1e-6; 1e-4 is far above.
        assert!(max_abs(&l1.get(0), &head.logits(&f_y1).squeeze_dim(0)) < 1e-4);
        assert!(max_abs(&l1.get(1), &head.logits(&f_y2).squeeze_dim(0)) < 1e-4);
        assert!(max_abs(&l2.get(0), &head.logits(&f_y3).squeeze_dim(0)) < 1e-4);
        // A sibling's token changes nothing for the other sibling.
        assert!(max_abs(&l1.get(0), &l1.get(1)) > 1e-4);
    });
}

#[test]
fn greedy_speculative_equals_plain_for_eagle1_and_medusa_tiny() {
    let dir = tiny_llama("heads", 96, 4.0, 31);
    let teacher = load(&dir);
    let tree = Tree::default_tree();
    for kind in [HeadKind::Eagle1, HeadKind::Medusa] {
        let head = head_of(&teacher, kind, 5, 5);
        for prompt in [vec![3i64, 17, 42, 5, 60, 61, 62], vec![11i64, 12]] {
            let plain = plain_greedy(&teacher, &prompt, 40, &[]);
            let (spec, stats) =
                generate_speculative(&teacher, &head, &tree, &prompt, 40, Sampling::greedy(), &[])
                    .unwrap();
            assert_eq!(spec.answer.token_ids, plain, "{kind:?}");
            assert!(stats.steps() >= 1 && stats.steps() <= 40);
        }
    }
}

/// A Medusa head with fewer heads than the tree is deep is refused, not run out of range.
#[test]
fn medusa_tree_deeper_than_its_heads_is_refused() {
    let dir = tiny_llama("heads-deep", 96, 4.0, 31);
    let teacher = load(&dir);
    let head = head_of(&teacher, HeadKind::Medusa, 3, 5);
    let tree = Tree::default_tree();
    let err = generate_speculative(&teacher, &head, &tree, &[3, 4], 8, Sampling::greedy(), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("medusa head drafts at most 3 depths"), "{err}");
}

/// The real SmolLM2-135M teacher with randomly initialised EAGLE-1 and Medusa heads: greedy
/// speculative output equals plain greedy token for token.
#[test]
fn greedy_speculative_equals_plain_smollm2_random_eagle1_and_medusa() {
    tch::set_num_threads(1);
    let dir = crate::common::smollm2_dir();
    let teacher = load(&dir);
    let tree = Tree::default_tree();
    let (prompt, stop) = crate::speculative::smollm2_chat_prompt(&dir);
    let plain = plain_greedy(&teacher, &prompt, 40, &stop);
    assert!(
        plain.len() >= 20,
        "answer too short to be a meaningful test"
    );
    for kind in [HeadKind::Eagle1, HeadKind::Medusa] {
        let head = head_of(&teacher, kind, 5, 1);
        let (spec, stats) = generate_speculative(
            &teacher,
            &head,
            &tree,
            &prompt,
            40,
            Sampling::greedy(),
            &stop,
        )
        .unwrap();
        eprintln!(
            "SmolLM2 random {kind:?}: tau {:.2}, accepted {:?}",
            stats.tau(),
            stats.accepted
        );
        assert_eq!(spec.answer.token_ids, plain, "{kind:?}");
    }
}

/// The Clover-2 ablation switches default to the reference, and each changes what it says.
#[test]
fn clover2_ablation_defaults_are_the_reference() {
    let o = HeadOptions::default();
    assert_eq!(o.head, HeadKind::Clover2);
    assert_eq!((o.num_depths, o.num_layers, o.decay), (5, 2, 0.7));
    assert!(o.regressive_connection);
    let arch = clover::model::kinds::arch_of(o.head);
    assert_eq!(
        (arch.regression_weight(&o), arch.distillation_weight(&o)),
        (10.0, 1.0)
    );
    assert_eq!(arch.input_noise(&o), 0.0);
    let teacher = tiny_teacher(Kind::Float);
    let cfg = HeadConfig::from_teacher(&teacher.config);
    let w = LossWeights::reference(&cfg);
    assert_eq!(
        (w.v_w, w.p_w, w.decay, w.heads_coefficient),
        (10.0, 1.0, 0.7, 1.0)
    );
    // A config that does not name the switches parses to the same options.
    let parsed: HeadOptions = toml::from_str("num_depths = 5").unwrap();
    assert_eq!(parsed, o);
}

#[test]
fn clover2_ablation_switches_change_what_they_say() {
    let teacher = tiny_teacher(Kind::Float);
    let mut cfg = HeadConfig::from_teacher(&teacher.config);
    cfg.options.regression_weight = Some(0.0);
    cfg.options.distillation_weight = Some(2.5);
    cfg.options.decay = 0.5;
    let w = LossWeights::reference(&cfg);
    assert_eq!((w.v_w, w.p_w), (0.0, 2.5));
    assert_eq!(w.depth_weight(2), 0.25);
    // Augmenting-Block layers: one layer fewer = nine tensors fewer.
    let shapes = |cfg: &HeadConfig| clover::model::clover2::Clover2.trainable_shapes(cfg).len();
    let full = shapes(&HeadConfig::from_teacher(&teacher.config));
    cfg.options.num_layers = 1;
    assert_eq!(shapes(&cfg), full - 9);
    // Regressive connection off: depths >= 1 ignore the chosen token; on, they do not.
    let state = clover::rng::seeded(3, || Tensor::randn([2, 64], (Kind::Float, Device::Cpu)));
    let (a, b) = (
        Tensor::from_slice(&[5i64, 6]),
        Tensor::from_slice(&[40i64, 70]),
    );
    let on = head_of(&teacher, HeadKind::Clover2, 3, 2);
    let mut off_cfg = on.config().clone();
    off_cfg.options.regressive_connection = false;
    let off = DraftHead::from_tensors(&teacher, off_cfg, &on.named_tensors()).unwrap();
    tch::no_grad(|| {
        assert!(max_abs(&on.step(&state, &a).0, &on.step(&state, &b).0) > 1e-4);
        assert_eq!(
            max_abs(&off.step(&state, &a).0, &off.step(&state, &b).0),
            0.0
        );
        assert!(max_abs(&off.step(&state, &a).0, &on.step(&state, &a).0) > 1e-4);
    });
}

/// The shared trainer takes every head: EAGLE-1 (with its seeded input noise) and Medusa train,
/// evaluate, checkpoint and resume to the same losses and weights as an uninterrupted run.
#[test]
fn trainer_trains_and_resumes_eagle1_and_medusa_exactly() {
    use clover::training::checkpoint::read_checkpoint_head;
    use clover::training::config::TrainOptions;
    use clover::training::trainer::{train, Source};
    let teacher = tiny_teacher(Kind::Float);
    let (train_set, eval_set) = (
        crate::common::tiny_samples(16, 1),
        crate::common::tiny_samples(4, 2),
    );
    for kind in [HeadKind::Eagle1, HeadKind::Medusa] {
        let config = |tag: &str| {
            let mut cfg = crate::common::tiny_train_config(&scratch_dir("heads", tag));
            cfg.head.head = kind;
            cfg
        };
        let run = |cfg: &clover::training::config::TrainConfig, resume, opts: &TrainOptions| {
            train(
                cfg,
                &teacher,
                Source::Online(train_set.clone()),
                eval_set.clone(),
                resume,
                opts,
                None,
            )
            .unwrap()
        };
        let full = run(
            &config(&format!("{}-a", kind.name())),
            Start::Fresh,
            &TrainOptions::default(),
        );
        assert_eq!(full.steps.len(), 6);
        let depths = if kind == HeadKind::Eagle1 { 1 } else { 3 };
        assert_eq!(full.steps[0].depth_loss.len(), depths, "{kind:?}");
        assert_eq!(full.evals.last().unwrap().chained_top1.len(), 3);
        let cfg_b = config(&format!("{}-b", kind.name()));
        let halt = TrainOptions {
            halt_after_step: Some(3),
            ..Default::default()
        };
        let first = run(&cfg_b, Start::Fresh, &halt);
        let rest = run(&cfg_b, Start::Resume, &TrainOptions::default());
        // Same ops, same seeded noise, restored state: bit-identical (1e-6 is below an f32 ulp of
        // these losses).
        for (a, b) in full.steps.iter().zip(first.steps.iter().chain(&rest.steps)) {
            assert!((a.loss - b.loss).abs() <= 1e-6, "{kind:?} step {}", a.step);
        }
        let (cfg_a, wa) = read_checkpoint_head(full.last_checkpoint.as_ref().unwrap()).unwrap();
        let (_, wb) = read_checkpoint_head(rest.last_checkpoint.as_ref().unwrap()).unwrap();
        assert_eq!(cfg_a.options.head, kind);
        if kind == HeadKind::Medusa {
            // Its vocabulary projections start as the lm_head and must learn too (the config's
            // default loss_chunk once left them without a distillation gradient).
            for k in 0..3 {
                let w = &wa[&format!("{k}.1.weight")];
                assert!(
                    max_abs(w, teacher.lm_head_weight()) > 0.0,
                    "Medusa head {k}'s projection never moved"
                );
            }
        }
        for (n, t) in &wa {
            assert!(
                max_abs(t, &wb[n]) <= 1e-6,
                "{kind:?}: {n} differs after resume"
            );
        }
    }
}

/// `clover report`: the table's numbers are the inputs' (τ, per category, acceptance, speedup,
/// parameters, and training tokens summed from the run's metrics.jsonl found through the
/// head's provenance.json), and the four PNGs are written and decode as PNG images.
#[test]
fn report_writes_table_from_inputs_and_decodable_pngs() {
    use clover::training::report::{write_report, ReportOptions, PLOTS, PROVENANCE_FILE};
    let dir = scratch_dir("heads", "report");
    let run = dir.join("run");
    let head_dir = dir.join("head");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::create_dir_all(&head_dir).unwrap();
    let step = |s: u64, tokens: usize| {
        format!(
            r#"{{"step":{s},"loss":1.0,"depth_loss":[1.0],"depth_top1":[0.5],"lr":0.001,"grad_norm":1.0,"tokens":{tokens}}}"#
        )
    };
    std::fs::write(
        run.join("metrics.jsonl"),
        [step(1, 100), step(2, 150), step(3, 250)].join("\n"),
    )
    .unwrap();
    let eval = |s: u64, loss: f64, c: f64| {
        format!(
            r#"{{"step":{s},"loss":{loss},"forced_top1":[0.5],"chained_top1":[{c},0.1],"starts":9,"unigram_top1":0.1}}"#
        )
    };
    std::fs::write(
        run.join("eval.jsonl"),
        [eval(0, 9.0, 0.1), eval(3, 4.5, 0.4)].join("\n"),
    )
    .unwrap();
    std::fs::write(
        head_dir.join(PROVENANCE_FILE),
        serde_json::json!({"checkpoint": run.join("checkpoints/step-00000003"), "run_dir": run})
            .to_string(),
    )
    .unwrap();
    let report = |name: &str, tau: f64, draft: Option<&std::path::Path>| {
        let file = dir.join(format!("{name}.json"));
        let v = serde_json::json!({
            "tau": tau, "tau_per_category": {"coding": tau + 0.25, "writing": tau - 0.25},
            "acceptance_per_depth": [0.625, 0.375, 0.125], "speedup": 1.5, "device": "cpu",
            "head": name, "head_parameters": 1234,
            "draft_dir": draft.map(|p| p.display().to_string()),
        });
        std::fs::write(&file, v.to_string()).unwrap();
        file
    };
    let evals = vec![
        report("eagle1", 2.5, Some(&head_dir)),
        report("medusa", 1.75, None),
    ];
    let out = dir.join("out");
    let runs = write_report(&ReportOptions {
        evals,
        out: out.clone(),
    })
    .unwrap();
    assert_eq!(runs[0].training_tokens, Some(500));
    let curve: Vec<(u64, f64)> = runs[0]
        .curve
        .iter()
        .map(|p| (p.tokens, p.chained_top1))
        .collect();
    assert_eq!(curve, vec![(0, 0.1), (500, 0.4)]);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for row in [
        "| eagle1 | eagle1 | 1234 | 500 | 2.500 | 2.750 | 2.250 | 0.625 / 0.375 / 0.125 | 1.50x | cpu |",
        "| medusa | medusa | 1234 | – | 1.750 | 2.000 | 1.500 | 0.625 / 0.375 / 0.125 | 1.50x | cpu |",
    ] {
        assert!(md.contains(row), "missing row {row} in\n{md}");
    }
    for plot in PLOTS {
        let file = std::fs::File::open(out.join(plot)).unwrap();
        let mut reader = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let frame = reader.next_frame(&mut buf).unwrap();
        assert_eq!((frame.width, frame.height), (960, 600), "{plot}");
        // Not a blank canvas: some pixels differ from the white background.
        assert!(
            buf[..frame.buffer_size()].iter().any(|&b| b < 200),
            "{plot} is blank"
        );
        assert!(md.contains(&format!("]({plot})")));
    }

    // An eval of several tree settings: one run per setting, its own tau, categories and
    // acceptance; the training curve once, with the first.
    let multi = dir.join("demo.json");
    let row = |tree: &str, tau: f64| {
        serde_json::json!({"tree": tree, "tree_tokens": 4, "tau": tau,
            "tau_per_category": {"coding": tau}, "acceptance_per_depth": [0.5],
            "draft_ms_per_step": 1.0, "verify_ms_per_step": 2.0, "other_ms_per_step": 0.0,
            "tokens_per_s": 10.0, "speedup": tau / 2.0, "lossless_mismatches": 0})
    };
    let v = serde_json::json!({
        "tau": 1.0, "tau_per_category": {"coding": 1.0}, "acceptance_per_depth": [],
        "speedup": 1.0, "device": "cpu", "head": "clover2", "head_parameters": 7,
        "draft_dir": head_dir.display().to_string(),
        "trees": [row("auto", 1.0), row("default", 1.5)],
    });
    std::fs::write(&multi, v.to_string()).unwrap();
    let runs = write_report(&ReportOptions {
        evals: vec![multi],
        out: dir.join("out-multi"),
    })
    .unwrap();
    let labels: Vec<&str> = runs.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(labels, ["demo auto", "demo default"]);
    assert!(runs.iter().all(|r| r.run_label == "demo"));
    assert_eq!(runs[1].tau_per_category["coding"], 1.5);
    assert_eq!(runs[1].acceptance_per_depth, vec![0.5]);
    assert_eq!((runs[0].curve.len(), runs[1].curve.len()), (2, 0));
    let md = std::fs::read_to_string(dir.join("out-multi/report.md")).unwrap();
    assert!(
        md.contains("| demo default | clover2 | 7 | 500 | 1.500 | 1.500 | 0.500 | 0.75x | cpu |"),
        "{md}"
    );
}

/// `clover train --set`: overrides replace config keys after the profile; VALUE is TOML or, when
/// it does not parse, a plain string; a malformed item is refused by name.
#[test]
fn train_set_overrides_keys() {
    use clover::training::config::{Profile, TrainConfig};
    let base = "model_dir = \"m\"\ndata_dir = \"d\"\nout_dir = \"o\"\nmax_steps = 100\n\
                [cuda]\nmax_steps = 4000\n";
    let sets = [
        "head=\"medusa\"",
        "max_steps=5",
        "out_dir=/tmp/run-x",
        "decay=0.8",
    ]
    .map(String::from);
    let cfg = TrainConfig::from_toml_with_overrides(base, "t", Profile::Cuda, &sets).unwrap();
    assert_eq!(cfg.head.head, HeadKind::Medusa);
    assert_eq!(cfg.max_steps, Some(5), "after the [cuda] table");
    assert_eq!(cfg.out_dir, std::path::PathBuf::from("/tmp/run-x"));
    assert_eq!(cfg.head.decay, 0.8);
    let plain = TrainConfig::from_toml_with_overrides(base, "t", Profile::Cpu, &[]).unwrap();
    assert_eq!(
        (plain.head.head, plain.max_steps),
        (HeadKind::Clover2, Some(100))
    );
    let err = TrainConfig::from_toml_with_overrides(base, "t", Profile::Cpu, &["max_steps".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("KEY=VALUE"), "{err}");
    // An unknown head kind is refused, listing the kinds.
    let bad = ["head=\"gpt\"".to_string()];
    let err = TrainConfig::from_toml_with_overrides(base, "t", Profile::Cpu, &bad).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("gpt") && err.contains("eagle1") && err.contains("medusa"),
        "{err}"
    );
}

/// The greedy acceptance counts of `calibrate`, replayed independently: for every root the
/// drafter starts afresh on the whole prefix, then steps along the teacher's greedy chain as
/// far as it is accepted and the text follows it. Returns (hits[d][r], trials[d]).
fn replay_acceptance(
    teacher: &Teacher,
    drafter: &mut dyn clover::decode::drafter::Drafter,
    texts: &[clover::decode::calibrate::CalibrationText],
    (k, depths): (usize, usize),
) -> (Vec<Vec<usize>>, Vec<usize>) {
    let _g = tch::no_grad_guard();
    let (mut hits, mut trials) = (vec![vec![0usize; k]; depths], vec![0usize; depths]);
    for text in texts {
        let ids = &text.input_ids;
        let n = ids.len() as i64;
        let u = teacher.forward(
            &Tensor::from_slice(ids).unsqueeze(0),
            &Tensor::arange(n, (Kind::Int64, Device::Cpu)).unsqueeze(0),
            None,
            None,
        );
        let pred =
            Vec::<i64>::try_from(teacher.logits(&u.squeeze_dim(0)).argmax(-1, false)).unwrap();
        for t in 0..ids.len() - 1 {
            if text.loss_mask[t + 1] != 1 || ids[t + 1] != pred[t] {
                continue;
            }
            drafter.reset();
            let next = Tensor::from_slice(&ids[1..=t + 1]).unsqueeze(0);
            let (mut logits, mut state) = drafter
                .extend(&u.narrow(1, 0, t as i64 + 1), &next)
                .unwrap();
            for d in 0..depths.min(ids.len() - t - 1) {
                trials[d] += 1;
                let top = Vec::<i64>::try_from(logits.topk(k as i64, -1, true, true).1.view([-1]))
                    .unwrap();
                let Some(r) = top.iter().position(|&x| x == pred[t + d + 1]) else {
                    break;
                };
                hits[d][r] += 1;
                if d + 1 == depths || t + d + 2 >= ids.len() || ids[t + d + 2] != pred[t + d + 1] {
                    break;
                }
                (logits, state) = drafter
                    .step(&state, &Tensor::from_slice(&[pred[t + d + 1]]))
                    .unwrap();
            }
        }
    }
    (hits, trials)
}

/// `calibrate` drafts through the drafter decoding uses for each head kind: a Medusa head is
/// measured at the depths it has heads for (3 here, though 5 are asked) without stepping past
/// them, each depth with its own head; EAGLE-1 with its context-dependent step. Each table
/// equals an independent replay through `drafter_for` (the old calibration stepped the head
/// directly: Medusa's head 1 at every depth and then a panic at "draft step", EAGLE-1's
/// context-free step).
#[test]
fn calibrate_measures_every_head_kind_through_its_decoding_drafter() {
    use clover::decode::calibrate::{calibrate, CalibrateOptions};
    use clover::decode::drafter::drafter_for;
    tch::set_num_threads(1);
    let dir = tiny_llama("heads-calibrate", 96, 4.0, 31);
    let teacher = load(&dir);
    let texts = crate::tree::greedy_texts(&teacher);
    let opts = CalibrateOptions {
        top_k: 4,
        max_depth: 5,
        max_tree_tokens: 8,
        contexts: vec![16],
        warmup: 1,
        repeats: 1,
        temperature: 0.0,
        seed: 0,
    };
    for (kind, measured) in [(HeadKind::Medusa, 3), (HeadKind::Eagle1, 5)] {
        let head = head_of(&teacher, kind, 3, 5);
        let calib = calibrate(&teacher, &head, None, &texts, &opts).unwrap();
        assert_eq!(calib.acceptance.len(), measured, "{kind:?}");
        let mut drafter = drafter_for(&head, None);
        let (hits, trials) = replay_acceptance(&teacher, drafter.as_mut(), &texts, (4, measured));
        assert_eq!(calib.trials, trials, "{kind:?}");
        for d in 0..measured {
            for r in 0..4 {
                // acceptance = hits / trials: rounding the product back recovers the count.
                let counted = (calib.acceptance[d][r] * trials[d] as f64).round() as usize;
                assert_eq!(counted, hits[d][r], "{kind:?} depth {} rank {r}", d + 1);
            }
        }
        // The sampled table, through the same drafter, stops at the same depths.
        let sampled_opts = CalibrateOptions {
            temperature: 0.8,
            ..opts.clone()
        };
        let sampled = calibrate(&teacher, &head, None, &texts, &sampled_opts).unwrap();
        assert_eq!(sampled.acceptance.len(), measured, "{kind:?}");
    }
}
