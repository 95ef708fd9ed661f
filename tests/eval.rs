//! `clover eval`: pooled figures by hand, and a small end-to-end run on SmolLM2.
use clover::decode::eval::{run, summarize, EvalOptions, EvalSettings, TurnRecord};
use clover::decode::tree_spec::TreeSpec;

fn record(cat: &str, accepted: Vec<usize>, tokens: usize, secs: f64, base_secs: f64) -> TurnRecord {
    TurnRecord {
        question_id: "1".into(),
        category: cat.into(),
        turn: 1,
        new_tokens: tokens,
        seconds: secs,
        baseline_new_tokens: tokens,
        baseline_seconds: base_secs,
        accepted,
        mismatch: false,
        draft_seconds: 0.0,
        verify_seconds: 0.0,
        prefill_seconds: 0.0,
    }
}

#[test]
fn summarize_pools_tau_acceptance_and_speed() {
    let mut b = record("b", vec![0, 0], 3, 1.0, 1.0);
    b.mismatch = true;
    let records = vec![
        record("a", vec![2, 0, 5], 10, 1.0, 4.0),
        record("a", vec![1], 3, 1.0, 2.0),
        b,
    ];
    let r = summarize(
        &records,
        &EvalSettings {
            max_depth: 5,
            ..Default::default()
        },
    );
    // committed: a = (3+1+6) + 2 = 12 over 4 steps; b = 2 over 2 steps; all 14 / 6.
    assert!((r.tau - 14.0 / 6.0).abs() < 1e-12);
    assert!((r.tau_per_category["a"] - 3.0).abs() < 1e-12);
    assert!((r.tau_per_category["b"] - 1.0).abs() < 1e-12);
    // reference variant: steps - 1 per turn = 2 + 0 + 1 = 3.
    assert!((r.tau_reference_variant - 14.0 / 3.0).abs() < 1e-12);
    // steps with >= d accepted: d1: 2,1 -> 3 (of 6); d2: 2,5 -> 2; d3..5: 5 -> 1.
    let want = [3.0, 2.0, 1.0, 1.0, 1.0].map(|x: f64| x / 6.0);
    assert_eq!(r.acceptance_per_depth.len(), 5);
    for (a, w) in r.acceptance_per_depth.iter().zip(want) {
        assert!((a - w).abs() < 1e-12);
    }
    assert!((r.tokens_per_s - 16.0 / 3.0).abs() < 1e-12);
    assert!((r.baseline_tokens_per_s - 16.0 / 7.0).abs() < 1e-12);
    assert!((r.speedup - 7.0 / 3.0).abs() < 1e-12);
    assert_eq!((r.lossless_mismatches, r.n_turns, r.new_tokens), (1, 3, 16));
}

/// A random (reference-init) head exported next to SmolLM2, two questions (one with two turns):
/// the report has every field, greedy is lossless, and tau is at least 1.
#[test]
fn eval_end_to_end_smollm2_random_head() {
    // Batch-1 decoding of a 135M model: intra-op threads only oversubscribe the 2 shared cores.
    tch::set_num_threads(1);
    let model = crate::common::smollm2_dir();
    let dir = crate::common::scratch_dir("eval", "end-to-end");
    let draft = dir.join("draft");
    crate::common::export_random_head(&model, &draft);
    let prompts = dir.join("q.jsonl");
    std::fs::write(
        &prompts,
        concat!(
            r#"{"question_id": 81, "category": "writing", "turns": ["Write one sentence about the sea.", "Now make it rhyme."]}"#,
            "\n\n",
            r#"{"question_id": 82, "category": "math", "turns": ["What is 12 times 12?"]}"#,
            "\n",
            r#"{"question_id": 83, "category": "math", "turns": ["Not evaluated: --limit 2"]}"#,
            "\n"
        ),
    )
    .unwrap();
    let report = dir.join("out").join("report.json");
    // A calibration whose costs say no tree can pay (verifying 2 tokens costs 3 plain steps):
    // "auto" must pick plain decoding.
    let calib = dir.join("calib.json");
    std::fs::write(
        &calib,
        serde_json::json!({
            "device": "Cpu", "dtype": "Float", "draft_vocab": 4096, "top_k": 2,
            "acceptance": [[0.5, 0.2], [0.5, 0.2]], "trials": [100, 50], "verify_by_context": [],
            "costs": {"verify_ms": {"points": [[1, 10.0], [2, 30.0], [64, 900.0]]},
                      "draft_step_ms": {"points": [[1, 1.0]]}, "depth0_ms": 1.0, "plain_ms": 10.0}
        })
        .to_string(),
    )
    .unwrap();
    let args = EvalOptions {
        model: model.clone(),
        draft,
        prompts,
        trees: vec![TreeSpec::Default, TreeSpec::Auto, TreeSpec::Dynamic],
        calib: Some(calib),
        calibration_texts: vec![],
        calibration_prompts: vec![],
        calibration_limit: None,
        calibrate: Default::default(),
        search: clover::decode::tree_search::SearchLimits {
            max_nodes: 8,
            max_depth: 3,
        },
        dynamic: clover::decode::dynamic::DynamicTree {
            tokens: 10,
            depth: 3,
            top_k: 4,
        },
        draft_vocab: Some((0..4096).collect()),
        temperature: 0.0,
        max_new_tokens: 12,
        run_on: clover::model::device::RunOn::cpu(),
        limit: Some(2),
        per_category: None,
        report: Some(report.clone()),
        template: None,
        no_system_prompt: false,
        seed: 0,
        warmup: 0,
    };
    run(&args).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    for key in [
        "tau",
        "tau_per_category",
        "acceptance_per_depth",
        "tokens_per_s",
        "baseline_tokens_per_s",
        "speedup",
        "tree_tokens",
        "temperature",
        "device",
        "n_prompts",
        "new_tokens",
        "lossless_mismatches",
        "tau_reference_variant",
    ] {
        assert!(json.get(key).is_some(), "report lacks {key}");
    }
    assert_eq!(json["n_prompts"], 2);
    assert_eq!(json["n_turns"], 3);
    assert_eq!(json["tree_tokens"], 26);
    assert_eq!(json["device"], "cpu");
    assert_eq!(json["lossless_mismatches"], 0);
    assert!(json["tau"].as_f64().unwrap() >= 1.0);
    assert_eq!(json["acceptance_per_depth"].as_array().unwrap().len(), 5);
    let cats = json["tau_per_category"].as_object().unwrap();
    assert_eq!(cats.len(), 2);
    // One row per tree setting, the first being the top-level figures; all lossless.
    let trees = json["trees"].as_array().unwrap();
    let names: Vec<&str> = trees.iter().map(|t| t["tree"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "auto", "dynamic"]);
    assert_eq!(trees[0]["tau"], json["tau"]);
    assert_eq!(
        trees[1]["tree_tokens"], 1,
        "auto must choose plain decoding here"
    );
    assert_eq!(trees[1]["tau"], 1.0);
    assert_eq!(trees[2]["tree_tokens"], 10);
    for t in trees {
        assert_eq!(t["lossless_mismatches"], 0, "{}", t["tree"]);
        for key in [
            "draft_ms_per_step",
            "verify_ms_per_step",
            "other_ms_per_step",
            "speedup",
        ] {
            assert!(t[key].as_f64().is_some(), "{} lacks {key}", t["tree"]);
        }
    }
    assert_eq!(json["draft_vocab"], 4096);
    // That table is greedy's: sampling with it is refused, naming the fix.
    let sampled = EvalOptions {
        trees: vec![TreeSpec::Auto],
        temperature: 0.7,
        report: None,
        ..args.clone()
    };
    let err = format!("{:#}", run(&sampled).unwrap_err());
    assert!(
        err.contains("calibrate again with --temperature 0.7"),
        "{err}"
    );
    // Calibrating on prompts like the evaluation's: of the file's three first turns, the two
    // evaluated here are left out, so only question 83's answer (<= 12 tokens) is measured.
    let first_turns: Vec<String> = clover::decode::eval::read_questions(&args.prompts)
        .unwrap()
        .into_iter()
        .map(|q| q.turns[0].clone())
        .collect();
    let held_out = EvalOptions {
        trees: vec![TreeSpec::Auto],
        calib: None,
        calibration_prompts: first_turns.clone(),
        calibrate: clover::decode::calibrate::CalibrateOptions {
            top_k: 4,
            max_depth: 2,
            max_tree_tokens: 4,
            contexts: vec![32],
            warmup: 1,
            repeats: 1,
            ..Default::default()
        },
        report: Some(report.clone()),
        ..args.clone()
    };
    run(&held_out).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let trials = json["auto"]["calibration"]["trials"][0].as_u64().unwrap();
    assert!((1..=12).contains(&trials), "{trials} positions calibrated");
    let only_evaluated = EvalOptions {
        calibration_prompts: first_turns[..2].to_vec(),
        ..held_out
    };
    let err = format!("{:#}", run(&only_evaluated).unwrap_err());
    assert!(err.contains("also evaluated"), "{err}");
    assert!(json["auto"]["search"]["paths"]
        .as_array()
        .unwrap()
        .is_empty());
    // `clover generate --draft` runs the same head speculatively.
    let gen = clover::cli::generate::GenerateArgs {
        model: model.clone(),
        prompt: "Say hello.".into(),
        chat: true,
        max_new_tokens: 6,
        temperature: 0.0,
        seed: 0,
        run_on: clover::model::device::RunOn::cpu(),
        json: true,
        draft: Some(dir.join("draft")),
        tree: TreeSpec::Default,
    };
    clover::cli::generate::run(&gen).unwrap();
}

#[test]
fn bad_question_files_are_reported_with_line_numbers() {
    let dir = crate::common::scratch_dir("eval", "questions");
    let file = dir.join("q.jsonl");
    std::fs::write(
        &file,
        "{\"question_id\": 1, \"turns\": [\"hi\"]}\n{\"question_id\": 2}\n",
    )
    .unwrap();
    let err = format!(
        "{:#}",
        clover::decode::eval::read_questions(&file).unwrap_err()
    );
    assert!(err.contains("line 2"), "{err}");
    std::fs::write(&file, "{\"question_id\": 1, \"turns\": []}\n").unwrap();
    assert!(clover::decode::eval::read_questions(&file).is_err());
    std::fs::write(&file, "{\"question_id\": 1, \"turns\": [\"hi\"]}\n").unwrap();
    let q = clover::decode::eval::read_questions(&file).unwrap();
    assert_eq!(q[0].category, "default");
}

/// `--tree chain:3` through the real binary on SmolLM2 with a random head: one setting named
/// `chain:3` of 4 tree tokens whose greedy output is plain decoding's on every turn, `generate
/// --tree chain:3` answers with plain greedy's tokens, and `chain:0` is refused by name.
#[test]
fn named_chain_decodes_losslessly_through_eval_and_generate() {
    use crate::common::run_clover;
    let model = crate::common::smollm2_dir();
    let dir = crate::common::scratch_dir("eval", "chain");
    let draft = dir.join("draft");
    crate::common::export_random_head(&model, &draft);
    let prompts = dir.join("q.jsonl");
    std::fs::write(
        &prompts,
        r#"{"question_id": 1, "category": "writing", "turns": ["Write one sentence about the sea.", "Now make it rhyme."]}"#,
    )
    .unwrap();
    let report = dir.join("report.json");
    let path = |p: &std::path::Path| p.display().to_string();
    let eval = |tree: &str| {
        let (model, draft, prompts, report) =
            (path(&model), path(&draft), path(&prompts), path(&report));
        run_clover(&[
            "eval",
            "--model",
            &model,
            "--draft",
            &draft,
            "--prompts",
            &prompts,
            "--tree",
            tree,
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
            "--report",
            &report,
        ])
    };
    let (code, text) = eval("chain:3");
    assert_eq!(code, 0, "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let row = &json["trees"][0];
    assert_eq!(row["tree"], "chain:3");
    assert_eq!(row["tree_tokens"], 4);
    assert_eq!(json["n_turns"], 2);
    assert_eq!(json["lossless_mismatches"], 0, "{json}");
    assert!(json["tau"].as_f64().unwrap() >= 1.0);

    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            path(&model),
            "--chat".into(),
            "--prompt".into(),
            "Name three primary colors.".into(),
            "--max-new-tokens".into(),
            "16".into(),
            "--device".into(),
            "cpu".into(),
            "--json".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let (code, text) = run_clover(&args);
        assert_eq!(code, 0, "{text}");
        let line = text
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap()
            .to_string();
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        json["token_ids"].clone()
    };
    let plain = generate(&[]);
    let chained = generate(&["--draft", &path(&draft), "--tree", "chain:3"]);
    assert!(plain.as_array().unwrap().len() >= 8);
    assert_eq!(chained, plain);

    let (code, text) = eval("chain:0");
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("chain:0") && text.contains("chain:1 to chain:"),
        "{text}"
    );
}
