//! The held-out tau estimate (`training::tau_estimate`, `training::teacher_path`) on real heads
//! of every kind: per start, the ranks and acceptance probabilities it reads along the teacher's
//! path equal those of the decoder's own drafter fed the same tokens; the default tree's drafts
//! it counts as accepted are those greedy speculative decoding accepts; and on SmolLM2 the
//! estimates of `evaluate` are finite and within [1, 1 + depth].

use crate::common::{f32_paths_bound, teacher_path_rows, tiny_teacher};
use clover::data::shards::Sample;
use clover::decode::drafter::drafter_for;
use clover::decode::sampling::Sampling;
use clover::decode::speculative::generate_speculative;
use clover::decode::tree::Tree;
use clover::model::head::DraftHead;
use clover::model::head_config::{HeadConfig, HeadKind};
use clover::model::teacher::Teacher;
use clover::training::batches::{make_batch, Batch};
use clover::training::tau_estimate::{tree_accepted, StartDrafts, NOT_DRAFTED};
use clover::training::teacher_path::{path_drafts, path_starts, teacher_greedy};
use tch::{Device, Kind, Tensor};

/// The default tree's depth: ranks for 5 depths, acceptance probabilities for all of them.
const DEPTHS: usize = 5;

const KINDS: [HeadKind; 3] = [HeadKind::Clover2, HeadKind::Eagle1, HeadKind::Medusa];

fn head_of(teacher: &Teacher, kind: HeadKind, seed: i64) -> DraftHead {
    let mut cfg = HeadConfig::from_teacher(&teacher.config);
    cfg.options.head = kind;
    cfg.options.num_depths = DEPTHS as i64;
    DraftHead::new(teacher, cfg, seed).unwrap()
}

fn batch_of(teacher: &Teacher, rows: &[Sample]) -> Batch {
    let refs: Vec<&Sample> = rows.iter().collect();
    make_batch(teacher, &refs, None, 512).unwrap()
}

/// What the decoder's drafter (`drafter_for`, as `generate_speculative` runs it) gives at start
/// `p` of batch row `row` when every draft is the teacher's token: committed rows 0..=p, then one
/// step per depth with the teacher's token.
fn drafter_figures(
    head: &DraftHead,
    teacher: &Teacher,
    batch: &Batch,
    (greedy, row, p): (&[i64], i64, i64),
) -> (StartDrafts, f64) {
    let t = batch.u.size()[1];
    let mut drafter = drafter_for(head, None);
    drafter.reset();
    let u = batch.u.narrow(0, row, 1).narrow(1, 0, p + 1);
    let next = batch.next_ids.narrow(0, row, 1).narrow(1, 0, p + 1);
    let (mut logits, mut state) = drafter.extend(&u, &next).unwrap();
    let u_flat = batch.u.reshape([-1, batch.u.size()[2]]);
    let mut figures = StartDrafts {
        ranks: vec![],
        alphas: vec![],
    };
    let mut scale = 0f64;
    for d in 0..DEPTHS as i64 {
        let at = row * t + p + 1 + d;
        let target = greedy[at as usize];
        let l = logits.reshape([-1]);
        scale = scale.max(l.abs().max().double_value(&[]));
        let above = l.gt(l.double_value(&[target])).sum(Kind::Int64);
        figures.ranks.push(above.int64_value(&[]) as u32);
        let p_t = teacher
            .logits(&u_flat.get(at).unsqueeze(0))
            .reshape([-1])
            .softmax(-1, Kind::Float);
        let q_t = l.softmax(-1, Kind::Float);
        figures
            .alphas
            .push(p_t.minimum(&q_t).sum(Kind::Double).double_value(&[]));
        if d + 1 < DEPTHS as i64 {
            let token = Tensor::from_slice(&[target]);
            (logits, state) = drafter.step(&state, &token).unwrap();
        }
    }
    (figures, scale)
}

/// Starts are the positions whose next 5 tokens are the teacher's greedy ones and whose 5
/// targets are masked: a token off the path at position 20 of one row rules out the starts
/// 15..=19 that feed it (or take it as a target); a mask 0 at position 12 of another rules out
/// 8..=12; every other start before them stays.
#[test]
fn starts_are_on_the_teachers_path_and_masked() {
    let teacher = tiny_teacher(Kind::Float);
    let starts_of = |rows: &[Sample]| {
        let batch = batch_of(&teacher, rows);
        path_starts(&batch, &teacher_greedy(&teacher, &batch.u), DEPTHS).unwrap()
    };
    let (_, mut rows) = teacher_path_rows(&teacher, 2, (6, 30), 13);
    let clean = starts_of(&rows);
    let t = 36i64;
    for row in 0..2 {
        let want: Vec<i64> = (5..=30).map(|p| row * t + p).collect();
        assert!(want.iter().all(|s| clean.contains(s)), "{clean:?}");
    }
    rows[0].input_ids[20] = (rows[0].input_ids[20] + 1) % 96;
    rows[1].loss_mask[12] = 0;
    let starts = starts_of(&rows);
    let kept = |row: i64, range: std::ops::RangeInclusive<i64>| {
        range
            .filter(|p| starts.contains(&(row * t + p)))
            .collect::<Vec<_>>()
    };
    assert_eq!(kept(0, 15..=19), Vec::<i64>::new(), "{starts:?}");
    assert_eq!(kept(0, 5..=14), (5..=14).collect::<Vec<_>>());
    assert_eq!(kept(1, 8..=12), Vec::<i64>::new(), "{starts:?}");
    assert_eq!(kept(1, 5..=7), vec![5, 6, 7]);
    assert_eq!(kept(1, 13..=30), (13..=30).collect::<Vec<_>>());
}

/// Every start on the teacher's path, for each kind of head: the batched walk along the path
/// reads the same ranks as the decoder's drafter (exactly: a rank moves only when two logits tie
/// within round-off) and the same acceptance probabilities within f32 round-off.
#[test]
fn path_figures_equal_the_decoders_drafter_for_every_head_kind() {
    let teacher = tiny_teacher(Kind::Float);
    let (_, rows) = teacher_path_rows(&teacher, 3, (6, 30), 11);
    let batch = batch_of(&teacher, &rows);
    let greedy = teacher_greedy(&teacher, &batch.u);
    let greedy_v: Vec<i64> = Vec::try_from(greedy.reshape([-1])).unwrap();
    let starts = path_starts(&batch, &greedy, DEPTHS).unwrap();
    // Positions 5 (the prompt's last) to 36 - 6 of each row are on the path (module doc of
    // `teacher_path`), 26 per row; a prompt position may be too, by chance.
    assert!(starts.len() >= 3 * 26, "{} starts", starts.len());
    let t = batch.u.size()[1];
    let (h, inter) = (teacher.config.hidden_size, teacher.config.intermediate_size);
    for kind in KINDS {
        let head = head_of(&teacher, kind, 4);
        let drafts = tch::no_grad(|| {
            path_drafts(
                &head,
                &teacher,
                &batch,
                &greedy,
                &starts,
                (DEPTHS, DEPTHS, 1.0),
            )
        })
        .unwrap();
        assert_eq!(drafts.len(), starts.len());
        let mut ranks_seen = std::collections::BTreeSet::new();
        for (&s, got) in starts.iter().zip(&drafts) {
            let (want, scale) = tch::no_grad(|| {
                drafter_figures(&head, &teacher, &batch, (&greedy_v, s / t, s % t))
            });
            assert_eq!(got.ranks, want.ranks, "{kind:?} start {s}");
            ranks_seen.extend(got.ranks.iter().copied());
            // The two walks reach the logits through different kernels (a whole row against a
            // KV cache): each draft layer's projections, attention over <= t keys and MLP, each
            // step's two 2H-wide products, the lm_head; the teacher's p is the same in both, and
            // |Δα| <= ||Δq||_1 <= 2 max |Δlogit|.
            let mut widths = vec![h, t, h, h, inter, h, t, h, h, inter, h];
            widths.extend([2 * h; 2 * DEPTHS]);
            let tol = 2.0 * f32_paths_bound(&widths, scale);
            for (d, (a, b)) in got.alphas.iter().zip(&want.alphas).enumerate() {
                assert!(
                    (a - b).abs() <= tol,
                    "{kind:?} start {s} depth {d}: alpha {a} vs {b} (tol {tol})"
                );
                assert!((0.0..=1.0).contains(a));
            }
        }
        // A check with teeth: the ranks compared are spread over the vocabulary.
        assert!(ranks_seen.len() > 10, "{kind:?}: ranks {ranks_seen:?}");
        assert!(!ranks_seen.contains(&NOT_DRAFTED));
    }
}

/// Greedy speculative decoding of each prompt with the default tree visits starts p, p + a + 1,
/// ...; at each visited start on the teacher's path it accepts exactly the drafts the estimate
/// counts there.
#[test]
fn default_tree_acceptance_equals_greedy_speculative_decoding() {
    let teacher = tiny_teacher(Kind::Float);
    let answer = 30;
    let (prompts, rows) = teacher_path_rows(&teacher, 3, (6, answer), 12);
    let batch = batch_of(&teacher, &rows);
    let greedy = teacher_greedy(&teacher, &batch.u);
    let starts = path_starts(&batch, &greedy, DEPTHS).unwrap();
    let t = batch.u.size()[1];
    let tree = Tree::default_tree();
    for kind in KINDS {
        let head = head_of(&teacher, kind, 6);
        let drafts = tch::no_grad(|| {
            path_drafts(&head, &teacher, &batch, &greedy, &starts, (DEPTHS, 0, 1.0))
        })
        .unwrap();
        let (mut compared, mut accepted) = (0, 0);
        for (row, (prompt, sample)) in prompts.iter().zip(&rows).enumerate() {
            let (spec, stats) = generate_speculative(
                &teacher,
                &head,
                &tree,
                prompt,
                answer,
                Sampling::greedy(),
                &[],
            )
            .unwrap();
            assert_eq!(spec.answer.token_ids, sample.input_ids[prompt.len()..]);
            // The first step drafts from the prompt's last position.
            let mut p = prompt.len() as i64 - 1;
            for &a in &stats.accepted {
                let flat = row as i64 * t + p;
                if let Ok(i) = starts.binary_search(&flat) {
                    assert_eq!(
                        tree_accepted(&tree, &drafts[i].ranks),
                        a,
                        "{kind:?} row {row} position {p}: ranks {:?}",
                        drafts[i].ranks
                    );
                    compared += 1;
                    accepted += a;
                }
                p += a as i64 + 1;
            }
        }
        eprintln!("{kind:?}: {compared} steps compared, {accepted} drafts accepted");
        assert!(
            compared >= 3 * 10,
            "{kind:?}: only {compared} steps compared"
        );
    }
}

/// The real SmolLM2 teacher with a random head of each kind, held-out answers of its own:
/// every estimate of `evaluate` is finite and within [1, 1 + depth] (the tree is 5 deep, the
/// chain 5 long), over starts that exist.
#[test]
fn smollm2_random_heads_estimate_within_range() {
    tch::set_num_threads(1);
    let dir = crate::common::smollm2_dir();
    let teacher = Teacher::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let (prompt, stop) = crate::speculative::smollm2_chat_prompt(&dir);
    let answer = crate::speculative::plain_greedy(&teacher, &prompt, 32, &stop);
    assert!(answer.len() >= 20, "answer too short: {answer:?}");
    let ids: Vec<i64> = prompt.iter().chain(&answer).copied().collect();
    let mut mask = vec![0u8; prompt.len() - 1];
    mask.resize(ids.len(), 1);
    let eval = vec![Sample {
        id: "smollm2".into(),
        input_ids: ids,
        loss_mask: mask,
    }];
    let out = crate::common::scratch_dir("tau", "smollm2");
    let cfg = clover::training::config::TrainConfig::from_toml(
        &format!(
            "model_dir = \"{}\"\ndata_dir = \"unused\"\nout_dir = \"{}\"\ndevice = \"cpu\"\n\
             max_steps = 1\nbatch_tokens = 512\nmax_len = 512\n",
            dir.display(),
            out.display()
        ),
        "smollm2.toml",
    )
    .unwrap();
    for kind in KINDS {
        let head = head_of(&teacher, kind, 2);
        let ev = clover::training::evaluate::evaluate(&head, &teacher, &eval, &cfg, 0).unwrap();
        eprintln!(
            "{kind:?}: tree {}, chain {}, chain T=1 {}, {} starts",
            ev.tau_est_default_tree, ev.tau_est_chain, ev.tau_est_chain_t1, ev.tau_starts
        );
        // Every start from the prompt's last position L - 1 to T - 6, the last whose 5 targets
        // (h_{p+1}..h_{p+5}) are in the row: T - 6 - (L - 1) + 1 = A + 1 - 5 of them.
        assert_eq!(ev.tau_starts, answer.len() + 1 - DEPTHS, "{kind:?}");
        assert_eq!(ev.tau_chain_depth, DEPTHS);
        for tau in [
            ev.tau_est_default_tree,
            ev.tau_est_chain,
            ev.tau_est_chain_t1,
        ] {
            assert!(
                tau.is_finite() && (1.0..=1.0 + DEPTHS as f64).contains(&tau),
                "{kind:?}: {tau}"
            );
        }
    }
}
