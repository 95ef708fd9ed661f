//! Draft vocabularies in training (`draft_vocab = N`, EAGLE-3) and the sampled acceptance table
//! of `clover calibrate --temperature`.

use crate::common::whole_batch_loss;
use crate::common::{tiny_samples, tiny_teacher, tiny_train_config, F64_U};
use crate::speculative::{greedy_with_mode, plain_greedy};
use clover::data::vocab::frequent_tokens;
use clover::decode::calibrate::committed_by_rank;
use clover::decode::dynamic::DynamicTree;
use clover::decode::tree::Tree;
use clover::decode::tree_policy::TreeMode;
use clover::model::draft_vocab::DraftVocab;
use clover::model::head::DraftHead;
use clover::training::checkpoint::read_checkpoint_head;
use clover::training::config::{TrainConfig, TrainOptions};
use clover::training::loss::{target_rows, DepthLoss, LossWeights};
use clover::training::run_dir::Start;
use clover::training::trainer::{train, Source};
use tch::{Device, Kind, Reduction, Tensor};

fn to_vec(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.to_device(Device::Cpu).view([-1])).unwrap()
}

/// The loss under a draft vocabulary of the even ids, against the same sums written out by hand
/// in f64: only the masked rows whose teacher argmax (over all 96 ids) is even remain; each
/// depth's soft cross-entropy runs over the 48 kept columns with the teacher's distribution
/// restricted to them and renormalised; both terms are divided by (kept rows + 1). The chunked
/// loss gives the same. Bound: both sides sum the same terms in other orders (reductions over H,
/// V and the M rows), so they differ by at most 2·(H + V + M)·u of the sum of the terms' sizes.
#[test]
fn draft_vocab_loss_restricts_renormalises_and_skips_rows_outside() {
    let teacher = tiny_teacher(Kind::Double);
    let mut head = crate::common::tiny_head(&teacher, 3, 11);
    head.to_kind(Kind::Double);
    let (u, next, mask) = crate::loss::inputs(&teacher);
    let outs = head.depth_outputs(&u, &next);
    let ids: Vec<i64> = (0..96).step_by(2).collect();
    let vocab = DraftVocab::new(teacher.lm_head_weight(), &ids, 1).unwrap();
    let w = LossWeights::reference(head.config());
    let lm = |_: usize, o: &Tensor| vocab.draft_logits(o);
    let loss = |chunk: usize| -> Vec<DepthLoss> {
        tch::no_grad(|| {
            whole_batch_loss(&teacher, (&u, &mask), &outs, &lm, &w, chunk, Some(&vocab)).depths
        })
    };
    let got = loss(0);

    let _g = tch::no_grad_guard();
    let rows = target_rows(&teacher, &u, &mask);
    let full = teacher.lm_head(&rows.h);
    let top = to_vec(&full.argmax(-1, false));
    let m = top.len();
    let keep: Vec<usize> = (0..m).filter(|&j| top[j] % 2 == 0).collect();
    assert!(
        !keep.is_empty() && keep.len() < m,
        "the case must keep some rows and drop some: argmax {top:?}"
    );
    let (pos, batch, t) = (to_vec(&rows.pos), to_vec(&rows.batch), rows.seq_len);
    let idx = Tensor::from_slice(&ids);
    let hdim = rows.h.size()[1];
    let bound = |scale: f64| 2.0 * (hdim + 96 + m as i64) as f64 * F64_U * scale;
    for (i, o) in outs.iter().enumerate() {
        let d = i as i64;
        let kept: Vec<i64> = keep
            .iter()
            .filter(|&&j| pos[j] >= d)
            .map(|&j| j as i64)
            .collect();
        let n = kept.len() as f64;
        let out_rows: Vec<i64> = kept
            .iter()
            .map(|&j| batch[j as usize] * (t - d) + pos[j as usize] - d)
            .collect();
        let kept_t = Tensor::from_slice(&kept);
        let o_sel = o
            .reshape([-1, hdim])
            .index_select(0, &Tensor::from_slice(&out_rows));
        let logq = o_sel
            .matmul(&teacher.lm_head_weight().index_select(0, &idx).tr())
            .log_softmax(-1, Kind::Double);
        let p = full
            .index_select(0, &kept_t)
            .index_select(1, &idx)
            .softmax(-1, Kind::Double);
        let terms = &p * &logq;
        let ploss = -terms.sum(Kind::Double).double_value(&[]) / (n + 1.0);
        let ploss_size = terms.abs().sum(Kind::Double).double_value(&[]) / (n + 1.0);
        let vloss = o_sel
            .smooth_l1_loss(&rows.h.index_select(0, &kept_t), Reduction::None, 1.0)
            .mean_dim(-1, false, Kind::Double)
            .sum(Kind::Double)
            .double_value(&[])
            / (n + 1.0);
        for (label, depths) in [("unchunked", got.clone()), ("chunk 2", loss(2))] {
            let dl = &depths[i];
            assert_eq!(dl.count, kept.len() as i64, "{label}, depth {i}");
            assert!(
                (dl.ploss - ploss).abs() <= bound(ploss_size),
                "{label}, depth {i}: ploss {} vs {ploss}",
                dl.ploss
            );
            assert!(
                (dl.vloss - vloss).abs() <= bound(vloss),
                "{label}, depth {i}: vloss {} vs {vloss}",
                dl.vloss
            );
        }
    }
}

fn vocab_config(out: &std::path::Path, n: usize) -> TrainConfig {
    let mut cfg = tiny_train_config(out);
    cfg.head.draft_vocab = Some(n);
    cfg.max_steps = Some(2);
    cfg.eval_every = 2;
    cfg.save_every = 2;
    cfg
}

/// A head trained with `draft_vocab = 40`: the vocabulary is the 40 most frequent answer tokens
/// of its training rows, stored in the checkpoint and exported as EAGLE-3's `d2t`/`t2d`; the
/// reloaded head drafts only from it, and greedy speculative decoding with it (static and
/// dynamic trees) equals plain decoding.
#[test]
fn trained_draft_vocab_exports_eagle3_mapping_and_decodes_losslessly() {
    let teacher = tiny_teacher(Kind::Float);
    let dir = crate::common::scratch_dir("vocab", "train");
    let samples = tiny_samples(16, 1);
    let out = train(
        &vocab_config(&dir, 40),
        &teacher,
        Source::Online(samples.clone()),
        tiny_samples(4, 2),
        Start::Fresh,
        &TrainOptions::default(),
        None,
    )
    .unwrap();
    assert!(out.steps.iter().all(|s| s.loss.is_finite() && s.loss > 0.0));
    let mut want = frequent_tokens(&samples, 40, 96).unwrap();
    want.sort_unstable();

    let ck = out.last_checkpoint.unwrap();
    assert_eq!(
        read_checkpoint_head(&ck).unwrap().0.options.draft_vocab,
        Some(40)
    );
    // `clover export`, as a user runs it.
    let exported = dir.join("exported");
    clover::cli::export::run(&clover::cli::export::ExportArgs {
        checkpoint: ck,
        out: exported.clone(),
        overwrite: false,
        with_frozen: false,
        model: None,
        format: clover::training::export::ExportFormat::Clover,
        verifier: None,
    })
    .unwrap();
    let stored: std::collections::BTreeMap<String, Tensor> =
        Tensor::read_safetensors(exported.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    // EAGLE-3: teacher id = draft index + d2t[index]; t2d marks the vocabulary's teacher ids.
    let d2t = to_vec(&stored["d2t"]);
    let back: Vec<i64> = d2t.iter().enumerate().map(|(i, o)| i as i64 + o).collect();
    assert_eq!(back, want);
    let t2d = Vec::<bool>::try_from(&stored["t2d"]).unwrap();
    assert_eq!(t2d.len(), 96);
    assert!((0..96i64).all(|v| t2d[v as usize] == want.contains(&v)));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exported.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(json["clover_rs"]["draft_vocab"], 40);

    let head = DraftHead::load(&exported, &teacher).unwrap();
    assert_eq!(to_vec(head.draft_vocab().unwrap().ids()), want);
    let err = head.slice_vocab(&[1, 2, 3], 1).err().unwrap().to_string();
    assert!(err.contains("leave out --draft-vocab"), "{err}");
    // Logits outside the vocabulary are -inf: nothing else can be drafted.
    let h = teacher.config.hidden_size;
    let o = Tensor::ones([2, h], (Kind::Float, Device::Cpu));
    let logits = head.logits_at(0, &o);
    let outside: Vec<i64> = (0..96).filter(|v| !want.contains(v)).collect();
    let off = logits.index_select(1, &Tensor::from_slice(&outside));
    assert!(bool::try_from(off.isinf().all()).unwrap());

    let tree = Tree::default_tree();
    let dynamic = DynamicTree {
        tokens: 12,
        depth: 3,
        top_k: 4,
    };
    for prompt in [vec![3i64, 17, 42, 5, 60, 61, 62], vec![11i64, 12]] {
        let plain = plain_greedy(&teacher, &prompt, 30, &[]);
        for mode in [TreeMode::Static(&tree), TreeMode::Dynamic(dynamic)] {
            let spec = greedy_with_mode(&teacher, &head, None, mode, &prompt, (30, &[]));
            assert_eq!(spec, plain, "{mode:?}");
        }
    }
}

/// Resuming on other data would train another vocabulary: refused, naming it. `draft_vocab` is
/// Clover-2's alone.
#[test]
fn draft_vocab_resume_and_config_are_checked() {
    let teacher = tiny_teacher(Kind::Float);
    let dir = crate::common::scratch_dir("vocab", "resume");
    let run = |samples, resume| {
        train(
            &vocab_config(&dir, 40),
            &teacher,
            Source::Online(samples),
            vec![],
            resume,
            &TrainOptions {
                halt_after_step: Some(1),
                ..Default::default()
            },
            None,
        )
    };
    let mut cfg = vocab_config(&dir, 40);
    cfg.save_every = 1;
    train(
        &cfg,
        &teacher,
        Source::Online(tiny_samples(16, 1)),
        vec![],
        Start::Fresh,
        &TrainOptions {
            halt_after_step: Some(1),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let err = format!("{:#}", run(tiny_samples(16, 9), Start::Resume).unwrap_err());
    assert!(err.contains("training data changed"), "{err}");
    // A checkpoint of an older clover records no data fingerprint: the vocabulary it stores is
    // still compared with the one the new data gives.
    let state = dir.join("checkpoints/step-00000001/state.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("data_fingerprint");
    std::fs::write(&state, json.to_string()).unwrap();
    let err = format!("{:#}", run(tiny_samples(16, 9), Start::Resume).unwrap_err());
    assert!(err.contains("draft vocabulary"), "{err}");

    let text =
        std::fs::read_to_string(crate::common::repo_root().join("configs/smollm2-135m.toml"))
            .unwrap();
    let eagle = format!("head = \"eagle1\"\ndraft_vocab = 4096\n{text}");
    let err = format!("{:#}", TrainConfig::from_toml(&eagle, "test").unwrap_err());
    assert!(
        err.contains("draft_vocab") && err.contains("Clover-2"),
        "{err}"
    );
}

/// `committed_by_rank` against its expectation, on one pair of 3-token distributions repeated
/// over n rows (its draws are the only randomness, so the row mean estimates the expectation
/// with standard deviation at most 0.5/√n for values in [0, 1]; 5σ is allowed). One child:
/// min(1, p/q) averaged over q is Σ min(p, q). Two children: the sum over both orders of draw,
/// written out.
#[test]
fn sampled_acceptance_matches_its_expectation() {
    let (p, q) = ([0.5f64, 0.3, 0.2], [0.2f64, 0.5, 0.3]);
    let n = 40_000i64;
    let rows = |x: &[f64]| {
        Tensor::from_slice(x)
            .to_kind(Kind::Float)
            .unsqueeze(0)
            .expand([n, 3], true)
            .contiguous()
    };
    let mean = |k: i64, seed: i64| -> Vec<f64> {
        let _rng = clover::rng::hold(seed);
        let c = committed_by_rank(&rows(&p), &rows(&q), k);
        Vec::<f64>::try_from(c.mean_dim(0, false, Kind::Double)).unwrap()
    };
    let tol = 5.0 * 0.5 / (n as f64).sqrt();

    let one = mean(1, 7);
    let tv: f64 = p.iter().zip(&q).map(|(a, b)| a.min(*b)).sum();
    assert!((one[0] - tv).abs() <= tol, "{one:?} vs {tv}");

    let mut want = [0.0f64; 2];
    let resid: Vec<f64> = p.iter().zip(&q).map(|(a, b)| (a - b).max(0.0)).collect();
    let mass: f64 = resid.iter().sum();
    for x1 in 0..3 {
        let a1 = (p[x1] / q[x1]).min(1.0);
        for x2 in (0..3).filter(|&x| x != x1) {
            let q2 = q[x2] / (1.0 - q[x1]);
            let draw = q[x1] * q2;
            let a2 = (resid[x2] / mass / q2).min(1.0);
            want[0] += draw * a1;
            want[1] += draw * (1.0 - a1) * a2;
        }
    }
    let two = mean(2, 8);
    for r in 0..2 {
        assert!(
            (two[r] - want[r]).abs() <= tol,
            "rank {r}: {two:?} vs {want:?}"
        );
    }
}
