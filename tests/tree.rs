//! Tree files: a JSON list of paths loads as the default tree does (the buffers themselves are
//! unit-tested next to their code in train/decode/tree.rs).
use clover::decode::tree::{mc_sim_7b_63, Tree};
use tch::Device;

#[test]
fn json_tree_file_round_trips_and_verify_mask_shape() {
    let dir = crate::common::scratch_dir("tree", "json-file");
    let file = dir.join("tree.json");
    std::fs::write(&file, serde_json::to_string(&mc_sim_7b_63()).unwrap()).unwrap();
    let t = Tree::from_json_file(&file).unwrap();
    assert_eq!(t.tree_indices, Tree::default_tree().tree_indices);
    std::fs::write(&file, "{\"not\": \"a list\"}").unwrap();
    assert!(Tree::from_json_file(&file).is_err());

    let tt = t.to_device(Device::Cpu);
    let m = tt.verify_mask(7);
    assert_eq!(m.size(), vec![1, 1, 26, 33]);
    let m: Vec<bool> = Vec::try_from(m.flatten(0, -1)).unwrap();
    for i in 0..26 {
        for j in 0..33 {
            let want = j < 7 || t.attn_mask[i][j - 7];
            assert_eq!(m[i * 33 + j], want);
        }
    }
}

/// Calibration texts of the shape of regenerated data: four short prompts, each followed by
/// the teacher's greedy answer of 20 tokens (the answer masked in).
pub fn greedy_texts(
    teacher: &clover::model::teacher::Teacher,
) -> Vec<clover::decode::calibrate::CalibrationText> {
    let prompts: Vec<Vec<i64>> = (0..4i64).map(|i| vec![2 + i, 30 + 7 * i, 60 - i]).collect();
    prompts
        .iter()
        .map(|p| {
            let answer = crate::speculative::plain_greedy(teacher, p, 20, &[]);
            let input_ids: Vec<i64> = p.iter().chain(&answer).copied().collect();
            let loss_mask = (0..input_ids.len())
                .map(|j| u8::from(j >= p.len()))
                .collect();
            clover::decode::calibrate::CalibrationText {
                input_ids,
                loss_mask,
            }
        })
        .collect()
}

/// `calibrate` on the tiny teacher with a random head, texts = prompts + the teacher's greedy
/// answers (the shape of the regenerated data): the table has the asked shape, each depth's ranks
/// are disjoint events, depth-1 counts equal an independent incremental replay through the
/// drafter's KV cache, the costs are positive and non-decreasing, and the file round-trips.
#[test]
fn calibrate_tiny_table_matches_incremental_replay() {
    use clover::decode::calibrate::{calibrate, CalibrateOptions, Calibration};
    use clover::decode::drafter::{Drafter, HeadDrafter};
    use tch::{Kind, Tensor};
    tch::set_num_threads(1);
    let dir = crate::speculative::tiny_llama("calib", 96, 4.0, 31);
    let teacher = crate::speculative::load(&dir);
    let head = crate::common::tiny_head(&teacher, 3, 5);
    let texts = greedy_texts(&teacher);
    let opts = CalibrateOptions {
        top_k: 4,
        max_depth: 3,
        max_tree_tokens: 10,
        contexts: vec![16, 32],
        warmup: 1,
        repeats: 3,
        temperature: 0.0,
        seed: 0,
    };
    let calib = calibrate(&teacher, &head, None, &texts, &opts).unwrap();
    // The table of tree sampling at T = 0.8 on the same texts: the committed rank is one event
    // per position, so each depth's row sums to at most 1, and it says which temperature it is for.
    let sampled_opts = CalibrateOptions {
        temperature: 0.8,
        seed: 3,
        ..opts.clone()
    };
    let sampled = calibrate(&teacher, &head, None, &texts, &sampled_opts).unwrap();
    assert_eq!(sampled.temperature, 0.8);
    assert_eq!(sampled.acceptance.len(), 3);
    for row in &sampled.acceptance {
        assert_eq!(row.len(), 4);
        assert!(row.iter().all(|&a| (0.0..=1.0).contains(&a)), "{row:?}");
        // Sums of per-position probabilities each <= 1, in f64: 1e-9 covers their rounding.
        assert!(row.iter().sum::<f64>() <= 1.0 + 1e-9, "{row:?}");
    }
    assert!(sampled.acceptance[0][0] > 0.0, "{:?}", sampled.acceptance);
    assert_eq!(calib.acceptance.len(), 3);
    assert!(calib.acceptance.iter().all(|row| row.len() == 4));
    for row in &calib.acceptance {
        // Ranks are disjoint events; 1e-12 covers the rounding of a few divisions.
        assert!(row.iter().sum::<f64>() <= 1.0 + 1e-12, "{row:?}");
    }
    assert!(
        calib.trials.windows(2).all(|w| w[0] >= w[1]),
        "{:?}",
        calib.trials
    );

    // Depth 1 by replay: feed the text one position at a time through the drafter's cache.
    let _g = tch::no_grad_guard();
    let mut drafter = HeadDrafter::new(&head);
    let mut hits = [0usize; 4];
    let mut trials = 0;
    for text in &texts {
        let ids = &text.input_ids;
        let n = ids.len() as i64;
        let u = teacher.forward(
            &Tensor::from_slice(ids).unsqueeze(0),
            &Tensor::arange(n, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0),
            None,
            None,
        );
        let pred =
            Vec::<i64>::try_from(teacher.logits(&u.squeeze_dim(0)).argmax(-1, false)).unwrap();
        drafter.reset();
        for t in 0..ids.len() - 1 {
            let (logits, _) = drafter
                .extend(
                    &u.narrow(1, t as i64, 1),
                    &Tensor::from_slice(&[ids[t + 1]]).unsqueeze(0),
                )
                .unwrap();
            if text.loss_mask[t + 1] == 1 && ids[t + 1] == pred[t] {
                trials += 1;
                let top =
                    Vec::<i64>::try_from(logits.topk(4, -1, true, true).1.view([-1])).unwrap();
                if let Some(r) = top.iter().position(|&x| x == pred[t + 1]) {
                    hits[r] += 1;
                }
            }
        }
    }
    assert_eq!(calib.trials[0], trials);
    for r in 0..4 {
        assert_eq!(
            (calib.acceptance[0][r] * trials as f64).round() as usize,
            hits[r],
            "rank {r}"
        );
    }

    let c = &calib.costs;
    assert!(c.plain_ms > 0.0 && c.depth0_ms > 0.0);
    let v = &c.verify_ms.points;
    assert_eq!(v.last().unwrap().0, 10);
    assert!(v.windows(2).all(|w| w[0].1 <= w[1].1), "{v:?}");
    let scratch = crate::common::scratch_dir("tree", "calib");
    let file = scratch.join("calib.json");
    calib.write(&file).unwrap();
    let back = Calibration::read(&file).unwrap();
    // serde_json's default float parser may land one ulp off the printed shortest form, so
    // read-back values are compared to within 2 ulps (2·2^-52 relative).
    let close = |a: f64, b: f64| (a - b).abs() <= 2.0 * f64::EPSILON * a.abs().max(b.abs());
    let flat = |c: &Calibration| -> Vec<f64> {
        let k = &c.costs;
        c.acceptance
            .iter()
            .flatten()
            .copied()
            .chain(k.verify_ms.points.iter().map(|p| p.1))
            .chain(k.draft_step_ms.points.iter().map(|p| p.1))
            .chain([k.depth0_ms, k.plain_ms])
            .collect()
    };
    let (a, b) = (flat(&calib), flat(&back));
    assert_eq!(a.len(), b.len());
    assert!(
        a.iter().zip(&b).all(|(x, y)| close(*x, *y)),
        "{a:?} vs {b:?}"
    );
    // Devices are spelled as eval reports spell them; a file written before that, with tch's
    // `Cpu` / `Cuda(0)`, still reads, in today's spelling.
    assert_eq!(calib.device, "cpu");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(json["device"], "cpu");
    for (old, now) in [("Cpu", "cpu"), ("Cuda(1)", "cuda:1")] {
        json["device"] = old.into();
        std::fs::write(&file, json.to_string()).unwrap();
        assert_eq!(Calibration::read(&file).unwrap().device, now);
    }
    std::fs::write(&file, "{\"acceptance\": []}").unwrap();
    let err = format!("{:#}", Calibration::read(&file).unwrap_err());
    assert!(err.contains("calib.json"), "{err}");
}
