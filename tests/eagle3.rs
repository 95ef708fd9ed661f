//! EAGLE-3 (docs/heads.md §6): the teacher's tapped layers, training-time test against tree
//! decoding, lossless greedy decoding on the real SmolLM2 teacher, and online training.

use std::collections::BTreeMap;

use crate::common::{scratch_dir, tiny_teacher};
use crate::speculative::{load, plain_greedy};
use clover::decode::drafter::{Drafter, TreeAttentionDrafter};
use clover::decode::dynamic::DynamicTree;
use clover::decode::sampling::Sampling;
use clover::decode::speculative::generate_with_mode;
use clover::decode::tree::Tree;
use clover::decode::tree_policy::TreeMode;
use clover::model::head::DraftHead;
use clover::model::head_config::{HeadConfig, HeadKind};
use clover::model::teacher::Teacher;
use clover::training::run_dir::Start;
use tch::{Device, Kind, Tensor};

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// A random EAGLE-3 head reading teacher layers `layers`, unrolled `ttt` steps in training.
fn eagle3_head(teacher: &Teacher, layers: Vec<i64>, ttt: i64, seed: i64) -> DraftHead {
    let mut cfg = HeadConfig::from_teacher(&teacher.config);
    cfg.options.head = HeadKind::Eagle3;
    cfg.options.teacher_layers = Some(layers);
    cfg.options.ttt_steps = Some(ttt);
    DraftHead::new(teacher, cfg, seed).unwrap()
}

fn positions(n: i64) -> Tensor {
    Tensor::arange(n, (Kind::Int64, Device::Cpu)).unsqueeze(0)
}

/// The tapped states are the inputs of the named layers (id L = the last pre-norm state u, the
/// plain forward's output), in the order named: layer 0's input is the token embedding.
#[test]
fn teacher_taps_are_the_named_layers_inputs() {
    let teacher = tiny_teacher(Kind::Float);
    let ids = Tensor::from_slice(&[5i64, 17, 42, 3, 60]).unsqueeze(0);
    tch::no_grad(|| {
        let plain = teacher.forward(&ids, &positions(5), None, None);
        let (u, taps) = teacher.forward_tapped(&ids, &positions(5), None, None, Some(&[2, 0]));
        assert_eq!(taps.size(), vec![1, 5, 128]);
        assert_eq!(max_abs(&u, &plain), 0.0);
        assert_eq!(max_abs(&taps.narrow(2, 0, 64), &plain), 0.0);
        let embed = teacher
            .weight("model.embed_tokens.weight")
            .unwrap()
            .index_select(0, &ids.reshape([-1]))
            .unsqueeze(0);
        assert_eq!(max_abs(&taps.narrow(2, 64, 64), &embed), 0.0);
    });
}

/// Training-time test is decoding: step j's output at row t (TTT, every row at once) equals
/// the tree drafter's node at depth j on the chain of teacher-forced tokens after the prefix
/// 0..=t, for every step; and a node attends to its ancestors (a changed step-1 token changes
/// step 2). f32 over a few positions, hidden 64, one layer: round-off a few 1e-6.
#[test]
fn eagle3_ttt_outputs_equal_tree_decoding_along_the_chain() {
    let teacher = tiny_teacher(Kind::Float);
    let head = eagle3_head(&teacher, vec![0, 1, 2], 3, 7);
    let ids: Vec<i64> = vec![5, 17, 42, 3, 60, 11, 8, 90];
    let t = ids.len() as i64;
    let input = Tensor::from_slice(&ids).unsqueeze(0);
    tch::no_grad(|| {
        let (_, feats) =
            teacher.forward_tapped(&input, &positions(t), None, None, Some(&[0, 1, 2]));
        let mut next = ids[1..].to_vec();
        next.push(0);
        let next = Tensor::from_slice(&next).unsqueeze(0);
        let outs = head.depth_outputs(&feats, &next);
        assert_eq!(outs.len(), 3);
        assert_eq!(outs[2].size(), vec![1, t - 2, 64]);
        for row in [0i64, 2, 4] {
            let mut drafter = TreeAttentionDrafter::new(&head);
            drafter.reset();
            let (l0, r0) = drafter
                .extend(&feats.narrow(1, 0, row + 1), &next.narrow(1, 0, row + 1))
                .unwrap();
            let want = |j: i64| head.logits_at(j, &outs[j as usize].select(1, row));
            assert!(max_abs(&l0, &want(0)) < 1e-4, "row {row} step 0");
            let tok = |j: i64| Tensor::from_slice(&[ids[(row + 1 + j) as usize]]);
            let (l1, r1) = drafter.step(&r0, &tok(1)).unwrap();
            assert!(max_abs(&l1, &want(1)) < 1e-4, "row {row} step 1");
            let (l2, _) = drafter.step(&r1, &tok(2)).unwrap();
            assert!(max_abs(&l2, &want(2)) < 1e-4, "row {row} step 2");
            // Another step-1 token: the step-2 node reads its ancestor, so it changes.
            let mut other = TreeAttentionDrafter::new(&head);
            other.reset();
            let (_, r0) = other
                .extend(&feats.narrow(1, 0, row + 1), &next.narrow(1, 0, row + 1))
                .unwrap();
            let (_, r1) = other.step(&r0, &Tensor::from_slice(&[77i64])).unwrap();
            let (l2_other, _) = other.step(&r1, &tok(2)).unwrap();
            assert!(
                max_abs(&l2, &l2_other) > 1e-4,
                "row {row}: step 2 ignores its ancestor"
            );
        }
    });
}

/// The real SmolLM2-135M teacher with a random EAGLE-3 head (reading layers [2, 15, 27], over a
/// seeded random draft vocabulary of 4096 tokens): greedy speculative output equals plain greedy
/// token for token, on the static tree and on a grown (dynamic) one.
#[test]
fn greedy_speculative_equals_plain_smollm2_random_eagle3_static_and_dynamic() {
    tch::set_num_threads(1);
    let dir = crate::common::smollm2_dir();
    let teacher = load(&dir);
    let (prompt, stop) = crate::speculative::smollm2_chat_prompt(&dir);
    let plain = plain_greedy(&teacher, &prompt, 40, &stop);
    assert!(
        plain.len() >= 20,
        "answer too short to be a meaningful test"
    );
    let mut cfg = HeadConfig::from_teacher(&teacher.config);
    cfg.options.head = HeadKind::Eagle3;
    cfg.options.draft_vocab = Some(4096);
    let mut head = DraftHead::new(&teacher, cfg, 3).unwrap();
    assert_eq!(head.teacher_layers(), Some(&[2i64, 15, 27][..]));
    let mut ids: Vec<i64> = clover::rng::seeded(11, || {
        Vec::try_from(Tensor::randperm(
            teacher.config.vocab_size,
            (Kind::Int64, Device::Cpu),
        ))
    })
    .unwrap();
    ids.truncate(4096);
    ids.sort_unstable();
    head.set_draft_vocab(&ids).unwrap();
    let tree = Tree::default_tree();
    let dynamic = DynamicTree {
        tokens: tree.len(),
        depth: tree.max_depth(),
        top_k: 10,
    };
    for (name, mode) in [
        ("static", TreeMode::Static(&tree)),
        ("dynamic", TreeMode::Dynamic(dynamic)),
    ] {
        let mut drafter = clover::decode::drafter::drafter_for(&head, None);
        let (spec, stats) = generate_with_mode(
            &teacher,
            drafter.as_mut(),
            mode,
            &prompt,
            40,
            Sampling::greedy(),
            &stop,
        )
        .unwrap();
        eprintln!(
            "SmolLM2 random EAGLE-3, {name} tree: tau {:.2}",
            stats.tau()
        );
        assert_eq!(spec.answer.token_ids, plain, "{name} tree");
    }
}

/// Online training of an EAGLE-3 head on the tiny teacher: one loss term per TTT step, the
/// resolved options (teacher layers, TTT steps, draft vocabulary) in the checkpoint, its own
/// lm_head learns, a resumed run is the uninterrupted one, and a distillation cache (which holds
/// only u) is refused with a reason.
#[test]
fn trainer_trains_and_resumes_eagle3_online() {
    use clover::training::checkpoint::read_checkpoint_head;
    use clover::training::config::TrainOptions;
    use clover::training::trainer::{train, Source};
    let teacher = tiny_teacher(Kind::Float);
    let (train_set, eval_set) = (
        crate::common::tiny_samples(16, 1),
        crate::common::tiny_samples(4, 2),
    );
    let config = |tag: &str| {
        let mut cfg = crate::common::tiny_train_config(&scratch_dir("eagle3", tag));
        cfg.head.head = HeadKind::Eagle3;
        cfg.head.teacher_layers = Some(vec![0, 1, 2]);
        cfg.head.ttt_steps = Some(3);
        cfg.head.draft_vocab = Some(48);
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
    let full = run(&config("a"), Start::Fresh, &TrainOptions::default());
    assert_eq!(full.steps.len(), 6);
    assert_eq!(full.steps[0].depth_loss.len(), 3);
    let cfg_b = config("b");
    let halt = TrainOptions {
        halt_after_step: Some(3),
        ..Default::default()
    };
    let first = run(&cfg_b, Start::Fresh, &halt);
    let rest = run(&cfg_b, Start::Resume, &TrainOptions::default());
    for (a, b) in full.steps.iter().zip(first.steps.iter().chain(&rest.steps)) {
        assert!((a.loss - b.loss).abs() <= 1e-6, "step {}", a.step);
    }
    let last = full.last_checkpoint.as_ref().unwrap();
    let (cfg_a, wa) = read_checkpoint_head(last).unwrap();
    let (_, wb) = read_checkpoint_head(rest.last_checkpoint.as_ref().unwrap()).unwrap();
    assert_eq!(cfg_a.options.head, HeadKind::Eagle3);
    assert_eq!(cfg_a.options.teacher_layers, Some(vec![0, 1, 2]));
    assert_eq!(wa["lm_head.weight"].size(), vec![48, 64]);
    assert_eq!(wa["d2t"].size(), vec![48]);
    let fresh: BTreeMap<String, Tensor> =
        DraftHead::new(&teacher, cfg_a.clone(), cfg_b.seed as i64)
            .unwrap()
            .named_tensors();
    assert!(
        max_abs(&wa["lm_head.weight"], &fresh["lm_head.weight"]) > 0.0,
        "lm_head never moved"
    );
    for (n, t) in &wa {
        assert!(max_abs(t, &wb[n]) <= 1e-6, "{n} differs after resume");
    }
    // A cache of u cannot feed it.
    let states = Some(vec![Tensor::zeros([6, 64], (Kind::Float, Device::Cpu))]);
    let sample = &train_set[0];
    let err = clover::training::batches::make_batch_reading(
        &teacher,
        &[sample],
        states,
        64,
        Some(&[0, 1, 2]),
    )
    .err()
    .expect("a cache is refused");
    assert!(err.to_string().contains("train it online"), "{err}");
}
