//! The trainer: exact resume, NaN stop, export round trip, bucketing, schedule, AdamW, configs.

use clover::training::run_dir::Start;
use std::collections::BTreeMap;

use crate::common::{
    max_abs_diff, repo_root, tiny_head, tiny_samples, tiny_teacher, tiny_train_config,
};
use clover::model::head::DraftHead;
use clover::training::checkpoint::{
    list_checkpoints, read_checkpoint_head, resolve_checkpoint, CK_TEACHER_CONFIG,
};
use clover::training::config::{TrainConfig, TrainOptions};
use clover::training::evaluate::evaluate;
use clover::training::export::export_head;
use clover::training::metrics::EvalRecord;

use clover::training::trainer::{train, Source};
use tch::{Device, Kind, Tensor};

#[test]
fn resume_continues_exactly_like_an_uninterrupted_run() {
    let teacher = tiny_teacher(Kind::Float);
    let (train_set, eval_set) = (tiny_samples(16, 1), tiny_samples(4, 2));
    let dir_a = crate::common::scratch_dir("trainer", "resume-a");
    let full = train(
        &tiny_train_config(&dir_a),
        &teacher,
        Source::Online(train_set.clone()),
        eval_set.clone(),
        Start::Fresh,
        &TrainOptions::default(),
        None,
    )
    .unwrap();
    assert_eq!(full.steps.len(), 6);
    assert!(full.steps.iter().all(|s| s.loss.is_finite()));
    assert_eq!(full.evals.len(), 3, "step 0, 3 and 6");
    assert_eq!(full.evals[0].step, 0);

    let dir_b = crate::common::scratch_dir("trainer", "resume-b");
    let cfg_b = tiny_train_config(&dir_b);
    let halt = TrainOptions {
        halt_after_step: Some(3),
        ..Default::default()
    };
    let first = train(
        &cfg_b,
        &teacher,
        Source::Online(train_set.clone()),
        eval_set.clone(),
        Start::Fresh,
        &halt,
        None,
    )
    .unwrap();
    assert_eq!(first.steps.len(), 3);
    let rest = train(
        &cfg_b,
        &teacher,
        Source::Online(train_set),
        eval_set,
        Start::Resume,
        &TrainOptions::default(),
        None,
    )
    .unwrap();
    assert_eq!(
        rest.steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        vec![4, 5, 6]
    );
    // Same ops on the same inputs in one process, with weights, moments and data order restored
    // exactly: bit-identical, so 1e-6 (under an f32 ulp of a loss ≈ 25) asks for exactness.
    for (a, b) in full.steps.iter().zip(first.steps.iter().chain(&rest.steps)) {
        assert_eq!(a.step, b.step);
        assert!(
            (a.loss - b.loss).abs() <= 1e-6,
            "step {}: {} vs {} after resume",
            a.step,
            a.loss,
            b.loss
        );
        assert!((a.lr - b.lr).abs() <= 1e-12);
    }
    assert_eq!(full.evals.last(), rest.evals.last());
    // Same final weights; only the newest `keep_last` checkpoints remain.
    let (_, wa) = read_checkpoint_head(full.last_checkpoint.as_ref().unwrap()).unwrap();
    let (_, wb) = read_checkpoint_head(rest.last_checkpoint.as_ref().unwrap()).unwrap();
    for (n, t) in &wa {
        assert!(max_abs_diff(t, &wb[n]) <= 1e-6, "{n} differs after resume");
    }
    let names: Vec<String> = list_checkpoints(&dir_a)
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["step-00000003", "step-00000006"]);
    let newest = full.last_checkpoint.clone().unwrap();
    assert_eq!(resolve_checkpoint(&dir_a.join("latest")).unwrap(), newest);
    assert_eq!(resolve_checkpoint(&dir_a).unwrap(), newest);
    assert!(
        dir_a.join("tensorboard").read_dir().unwrap().count() > 0,
        "TensorBoard events written"
    );
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let teacher = tiny_teacher(Kind::Float);
    let dir = crate::common::scratch_dir("trainer", "nan");
    let mut cfg = tiny_train_config(&dir);
    cfg.save_every = 1;
    cfg.keep_last = 5;
    let opts = TrainOptions {
        inject_nan_at_step: Some(3),
        ..Default::default()
    };
    let err = train(
        &cfg,
        &teacher,
        Source::Online(tiny_samples(8, 3)),
        vec![],
        Start::Fresh,
        &opts,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("non-finite loss at step 3, depth 0"), "{err}");
    assert!(
        err.contains("step-00000002"),
        "names the kept checkpoint: {err}"
    );
    let names: Vec<String> = list_checkpoints(&dir)
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["step-00000001", "step-00000002"]);
    read_checkpoint_head(&dir.join("checkpoints/step-00000002")).unwrap();
}

#[test]
fn export_then_reload_gives_identical_logits_and_can_seed_training() {
    let teacher = tiny_teacher(Kind::Float);
    let dir = crate::common::scratch_dir("trainer", "export");
    let mut cfg = tiny_train_config(&dir);
    cfg.max_steps = Some(2);
    cfg.eval_every = 0;
    let out = train(
        &cfg,
        &teacher,
        Source::Online(tiny_samples(6, 4)),
        vec![],
        Start::Fresh,
        &TrainOptions::default(),
        None,
    )
    .unwrap();
    let ck = out.last_checkpoint.unwrap();
    let (head_cfg, tensors) = read_checkpoint_head(&ck).unwrap();
    let trained = DraftHead::from_tensors(&teacher, head_cfg.clone(), &tensors).unwrap();
    let exported = dir.join("exported");
    export_head(
        &head_cfg,
        &tensors,
        &ck.join(CK_TEACHER_CONFIG),
        None,
        &exported,
    )
    .unwrap();
    let reloaded = DraftHead::load(&exported, &teacher).unwrap();
    assert_eq!(reloaded.config(), &head_cfg);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exported.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(json["clover"]["num_heads"], 3);
    assert_eq!(json["clover"]["decay_coefficient"], 0.7);
    assert_eq!(json["hidden_size"], 64);
    // The draft runs RoPE unscaled with its own base (docs/clover2.md G2), whatever the teacher's
    // scaling (this teacher's is llama3-style, theta 500000): the exported config says so.
    let teacher_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join(CK_TEACHER_CONFIG)).unwrap())
            .unwrap();
    assert_eq!(teacher_json["rope_parameters"]["rope_type"], "llama3");
    assert_eq!(json.get("rope_scaling"), Some(&serde_json::Value::Null));
    assert!(json.get("rope_parameters").is_none());
    assert_eq!(json["rope_theta"], 10000.0);
    let keys: Vec<String> = Tensor::read_safetensors(exported.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|x| x.0)
        .collect();
    for k in [
        "layers.1.self_attn.q_proj.weight",
        "clover_head_mlp_rnn.q.weight",
        "clover_head_mlp_rnn2.input_layernorm.weight",
        "clover_head_mlp2.weight",
        "clover_norm.weight",
    ] {
        assert!(keys.iter().any(|x| x == k), "{k} exported");
    }
    tch::no_grad(|| {
        let t = 5;
        let u = Tensor::randn([1, t, 64], (Kind::Float, Device::Cpu));
        let next = Tensor::from_slice(&[3i64, 9, 27, 81, 4]).view([1, t]);
        let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let (oa, sa) = trained.depth0(&u, &next, &pos, None, None);
        let (ob, sb) = reloaded.depth0(&u, &next, &pos, None, None);
        assert_eq!(
            max_abs_diff(&trained.logits(&oa), &reloaded.logits(&ob)),
            0.0
        );
        let (oa, _) = trained.step(&sa, &next);
        let (ob, _) = reloaded.step(&sb, &next);
        assert_eq!(
            max_abs_diff(&trained.logits(&oa), &reloaded.logits(&ob)),
            0.0
        );
    });
    // Training can start from the exported head: its weights are the starting point.
    let mut cfg2 = tiny_train_config(&dir.join("second"));
    cfg2.init_from = Some(exported.clone());
    cfg2.max_steps = Some(1);
    cfg2.lr = 0.0;
    cfg2.weight_decay = 0.0;
    let out2 = train(
        &cfg2,
        &teacher,
        Source::Online(tiny_samples(6, 4)),
        vec![],
        Start::Fresh,
        &TrainOptions::default(),
        None,
    )
    .unwrap();
    let (_, after) = read_checkpoint_head(out2.last_checkpoint.as_ref().unwrap()).unwrap();
    assert_eq!(
        max_abs_diff(
            &after["clover_head_mlp2.weight"],
            &tensors["clover_head_mlp2.weight"]
        ),
        0.0
    );
    // A missing or misshapen key fails loudly, naming it.
    let mut broken: BTreeMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    broken.remove("clover_head_mlp_rnn2.k.bias");
    broken.insert(
        "clover_norm.weight".into(),
        Tensor::ones([3], (Kind::Float, Device::Cpu)),
    );
    let err = export_head(
        &head_cfg,
        &broken,
        &ck.join(CK_TEACHER_CONFIG),
        None,
        &dir.join("bad"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("missing clover_head_mlp_rnn2.k.bias")
            && err.contains("clover_norm.weight: shape [3]"),
        "{err}"
    );
}

#[test]
fn shipped_configs_parse() {
    for name in ["smollm2-135m", "vicuna-7b", "llama3-8b-instruct"] {
        let path = repo_root().join("configs").join(format!("{name}.toml"));
        let mut text = std::fs::read_to_string(&path).unwrap();
        // Parse as on a CPU-only machine, so the [cuda] override is not applied.
        text = text.replace("device = \"auto\"", "device = \"cpu\"");
        let cfg = TrainConfig::from_toml(&text, &path.display().to_string())
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(
            (cfg.lr, cfg.betas, cfg.weight_decay, cfg.clip_value),
            (1e-3, (0.9, 0.95), 0.01, 0.5),
            "{name}"
        );
        assert_eq!(
            (cfg.head.num_depths, cfg.head.num_layers, cfg.head.decay),
            (5, 2, 0.7),
            "{name}"
        );
    }
}

#[test]
fn chained_eval_accuracy_is_cumulative_over_depths() {
    let teacher = tiny_teacher(Kind::Float);
    let head = tiny_head(&teacher, 4, 3);
    let dir = crate::common::scratch_dir("trainer", "eval");
    let cfg = tiny_train_config(&dir);
    // Loss masks all 1, and answers that follow the teacher's own greedy choice so starts exist.
    let mut evs = tiny_samples(4, 8);
    for s in &mut evs {
        s.loss_mask = vec![1; s.input_ids.len()];
        for j in 1..s.input_ids.len() {
            let ids = Tensor::from_slice(&s.input_ids[..j]).view([1, j as i64]);
            let pos = Tensor::arange(j as i64, (Kind::Int64, Device::Cpu)).unsqueeze(0);
            let u = tch::no_grad(|| teacher.forward(&ids, &pos, None, None));
            s.input_ids[j] = teacher
                .logits(&u)
                .get(0)
                .get(j as i64 - 1)
                .argmax(-1, false)
                .int64_value(&[]);
        }
    }
    let ev = evaluate(&head, &teacher, &evs, &cfg, 0).unwrap();
    assert!(ev.starts > 0);
    assert_eq!(ev.chained_top1.len(), 4);
    for w in ev.chained_top1.windows(2) {
        assert!(
            w[1] <= w[0],
            "chained accuracy cannot rise with depth: {:?}",
            ev.chained_top1
        );
    }
    assert!(ev.loss.is_finite() && (0.0..=1.0).contains(&ev.unigram_top1));
}

#[test]
fn offline_cache_training_matches_online_within_bf16_rounding() {
    let root = crate::common::scratch_dir("trainer", "offline");
    let data = root.join("data");
    let train_set = tiny_samples(12, 21);
    clover::data::shards::write_samples(&data, clover::data::shards::Split::Train, &train_set)
        .unwrap();
    clover::data::shards::write_samples(
        &data,
        clover::data::shards::Split::Eval,
        &tiny_samples(3, 22),
    )
    .unwrap();
    let cache = root.join("cache");
    clover::training::targets::run(&clover::training::targets::DistillOptions {
        data: data.clone(),
        model: repo_root().join("tests/fixtures/tiny-llama-untied"),
        out: cache.clone(),
        run_on: clover::model::device::RunOn {
            device: clover::model::device::DeviceChoice::Cpu,
            dtype: clover::model::device::DtypeChoice::Bf16,
        },
        shard: "0/1".into(),
        batch_tokens: 64,
        max_shards: None,
    })
    .unwrap();
    let teacher = tiny_teacher(Kind::Float);
    let mut cfg = tiny_train_config(&root.join("online"));
    cfg.max_steps = Some(3);
    cfg.eval_every = 0;
    let online = train(
        &cfg,
        &teacher,
        Source::Online(train_set),
        vec![],
        Start::Fresh,
        &TrainOptions::default(),
        None,
    )
    .unwrap();
    // The same run through the CLI entry point, offline, from a TOML file.
    let toml = format!(
        "model_dir = \"{}\"\ndata_dir = \"{}\"\ndistill_cache = \"{}\"\nout_dir = \"{}\"\ndevice = \"cpu\"\n\
         num_depths = 3\nmax_steps = 3\nbatch_tokens = 48\nbucket_window = 8\nwarmup_steps = 2\n\
         eval_every = 3\nsave_every = 3\neval_samples = 4\nseed = 5\nprogress = false\n",
        repo_root().join("tests/fixtures/tiny-llama-untied").display(),
        data.display(),
        cache.display(),
        root.join("offline").display()
    );
    std::fs::write(root.join("offline.toml"), toml).unwrap();
    clover::cli::train::run(&clover::cli::train::TrainArgs {
        config: root.join("offline.toml"),
        resume: false,
        overwrite: false,
        profile: clover::training::config::Profile::Auto,
        overrides: vec![],
        dist_backend: clover::distributed::Backend::Auto,
    })
    .unwrap();
    let lines = std::fs::read_to_string(root.join("offline/metrics.jsonl")).unwrap();
    let offline: Vec<clover::training::metrics::StepRecord> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(offline.len(), 3);
    for (a, b) in online.steps.iter().zip(&offline) {
        let rel = (a.loss - b.loss).abs() / a.loss.abs();
        assert!(
            rel < 2e-2,
            "step {}: online {} vs offline {} (bf16 cache)",
            a.step,
            a.loss,
            b.loss
        );
    }
    assert!(
        root.join("offline/eval.jsonl").exists(),
        "eval on the prepared eval split ran"
    );
}

/// Conversation batching accumulates the micro-batches' gradients as their mean, each with its
/// own loss normaliser: a step of two micro-batches holding the same conversation must equal a
/// token-batched step on that conversation alone (same loss, same gradient norm before clipping,
/// same weights), where forgetting the 1/2 would double the gradient norm. Halving and adding two
/// equal f32 numbers is exact, so the runs agree to the last bit (1e-6 asks for that).
#[test]
fn conversation_batching_averages_micro_batch_gradients() {
    let teacher = tiny_teacher(Kind::Float);
    let one = tiny_samples(1, 11);
    let twice = vec![one[0].clone(), one[0].clone()];
    let len = one[0].input_ids.len();
    let run =
        |name: &str, set: Vec<clover::data::shards::Sample>, edit: &dyn Fn(&mut TrainConfig)| {
            let mut cfg = tiny_train_config(&crate::common::scratch_dir("trainer", name));
            cfg.eval_every = 0;
            edit(&mut cfg);
            train(
                &cfg,
                &teacher,
                Source::Online(set),
                vec![],
                Start::Fresh,
                &TrainOptions::default(),
                None,
            )
            .unwrap()
        };
    let tokens = run("accumulate-tokens", one, &|cfg| cfg.batch_tokens = len);
    let conversations = run("accumulate-conversations", twice, &|cfg| {
        cfg.conversations_per_step = Some(2);
        cfg.micro_batch_tokens = Some(len);
    });
    assert_eq!(conversations.steps.len(), 6);
    for (a, b) in tokens.steps.iter().zip(&conversations.steps) {
        assert_eq!(
            b.tokens,
            2 * a.tokens,
            "two micro-batches of one conversation"
        );
        assert!(
            (a.loss - b.loss).abs() <= 1e-6,
            "step {}: {} vs {}",
            a.step,
            a.loss,
            b.loss
        );
        assert!(
            (a.grad_norm - b.grad_norm).abs() <= 1e-6 * a.grad_norm,
            "step {}: grad norm {} vs {}",
            a.step,
            a.grad_norm,
            b.grad_norm
        );
    }
    let (_, wa) = read_checkpoint_head(tokens.last_checkpoint.as_ref().unwrap()).unwrap();
    let (_, wb) = read_checkpoint_head(conversations.last_checkpoint.as_ref().unwrap()).unwrap();
    for (n, t) in &wa {
        assert!(max_abs_diff(t, &wb[n]) <= 1e-6, "{n} differs");
    }
}

/// The two conversation-batching keys come together, and the micro-batch must hold the longest
/// row: both refused with the key named.
#[test]
fn conversation_batching_keys_are_checked() {
    let dir = crate::common::scratch_dir("trainer", "conversation-keys");
    let base = tiny_train_config(&dir);
    let mut lone = base.clone();
    lone.conversations_per_step = Some(4);
    let err = lone.validate("cfg").unwrap_err().to_string();
    assert!(err.contains("micro_batch_tokens"), "{err}");
    let mut small = base;
    small.conversations_per_step = Some(4);
    small.micro_batch_tokens = Some(4);
    let teacher = tiny_teacher(Kind::Float);
    let err = train(
        &small,
        &teacher,
        Source::Online(tiny_samples(4, 3)),
        vec![],
        Start::Fresh,
        &TrainOptions::default(),
        None,
    )
    .err()
    .expect("rows longer than the micro-batch")
    .to_string();
    assert!(
        err.contains("micro_batch_tokens = 4 is below the longest training row"),
        "{err}"
    );
}

/// A 12-step run evaluated after every step on held-out answers of the teacher's own (so the tau
/// estimate has starts), checkpointing every step and keeping one.
fn best_run_config(out: &std::path::Path) -> TrainConfig {
    let mut cfg = tiny_train_config(out);
    cfg.eval_every = 1;
    cfg.save_every = 1;
    cfg.keep_last = 1;
    cfg.max_steps = Some(12);
    // A rate at which the estimate moves within 12 steps: it rises to a peak and falls again.
    cfg.lr = 2e-2;
    cfg
}

fn path_eval_rows(teacher: &clover::model::teacher::Teacher) -> Vec<clover::data::shards::Sample> {
    crate::common::teacher_path_rows(teacher, 4, (4, 16), 21).1
}

/// The evaluation a run must keep as `best`: the highest default-tree estimate after step 0,
/// the earlier of equal ones.
fn expected_best(evals: &[EvalRecord]) -> &EvalRecord {
    let mut best: Option<&EvalRecord> = None;
    for ev in evals.iter().filter(|e| e.step > 0) {
        assert!(ev.tau_starts > 0, "step {}: no starts", ev.step);
        if best.is_none_or(|b| ev.tau_est_default_tree > b.tau_est_default_tree) {
            best = Some(ev);
        }
    }
    best.expect("evaluations after step 0")
}

fn state_json(ck: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(ck.join("state.json")).unwrap()).unwrap()
}

/// `checkpoints/best` holds the evaluation with the highest default-tree tau estimate: the same
/// weights (evaluated again they give that evaluation's record, bit for bit), kept while pruning
/// leaves only the newest step checkpoint, named by `RUN/best`, and exported by `clover export`.
#[test]
fn best_checkpoint_follows_the_tau_estimate_through_pruning_and_export() {
    let teacher = tiny_teacher(Kind::Float);
    let dir = crate::common::scratch_dir("trainer", "best");
    let cfg = best_run_config(&dir);
    let eval_rows = path_eval_rows(&teacher);
    let out = train(
        &cfg,
        &teacher,
        Source::Online(tiny_samples(16, 1)),
        eval_rows.clone(),
        Start::Fresh,
        &TrainOptions::default(),
        None,
    )
    .unwrap();
    let taus: Vec<f64> = out.evals.iter().map(|e| e.tau_est_default_tree).collect();
    eprintln!("default-tree estimates by step: {taus:?}");
    let want = expected_best(&out.evals);
    // What makes the test able to fail: the best is neither the first evaluation after step 0
    // nor the last (nor, where a later one ties it, that later one).
    assert!((2..12).contains(&want.step), "best at step {}", want.step);
    let best = out.best.expect("a best checkpoint");
    assert_eq!(
        (best.step, best.tau_est_default_tree),
        (want.step, want.tau_est_default_tree)
    );
    let best_dir = dir.join("checkpoints").join("best");
    assert_eq!(resolve_checkpoint(&dir.join("best")).unwrap(), best_dir);
    assert_eq!(resolve_checkpoint(&best_dir).unwrap(), best_dir);
    // Pruned down to the newest step checkpoint; `latest` is still that one, not `best`.
    let names: Vec<String> = list_checkpoints(&dir)
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["step-00000012"]);
    assert_eq!(
        resolve_checkpoint(&dir.join("latest")).unwrap(),
        dir.join("checkpoints/step-00000012")
    );
    // The state names its own evaluation, and the weights are the ones that scored it.
    let state = state_json(&best_dir);
    assert_eq!(state["step"], want.step);
    assert_eq!(state["best"]["step"], want.step);
    let (head_cfg, tensors) = read_checkpoint_head(&best_dir).unwrap();
    let head = DraftHead::from_tensors(&teacher, head_cfg, &tensors).unwrap();
    let again = evaluate(&head, &teacher, &eval_rows, &cfg, want.step).unwrap();
    assert_eq!(&again, want);
    // `clover export --checkpoint RUN/best`.
    let exported = dir.join("export");
    clover::cli::export::run(&clover::cli::export::ExportArgs {
        checkpoint: dir.join("best"),
        out: exported.clone(),
        overwrite: false,
        with_frozen: false,
        model: None,
        format: clover::training::export::ExportFormat::Clover,
        verifier: None,
    })
    .unwrap();
    let loaded = DraftHead::load(&exported, &teacher).unwrap();
    for (name, t) in loaded.named_tensors() {
        assert_eq!(max_abs_diff(&t, &tensors[&name]), 0.0, "{name}");
    }
    // No best yet is said so by name.
    let fresh = crate::common::scratch_dir("trainer", "best-none");
    let err = format!("{:#}", resolve_checkpoint(&fresh.join("best")).unwrap_err());
    assert!(err.contains("no best checkpoint"), "{err}");
}

/// The best survives `--resume`: halted right after its best evaluation and resumed, a run keeps
/// the uninterrupted run's best (the later, lower or equal, estimates must not replace it); the
/// value the resumed checkpoint records is what later evaluations must beat; and a checkpoint of
/// an older version, which records none, resumes and keeps a new best.
#[test]
fn resume_keeps_the_recorded_best() {
    let teacher = tiny_teacher(Kind::Float);
    let eval_rows = path_eval_rows(&teacher);
    let run = |dir: &std::path::Path, start: Start, halt: Option<u64>| {
        let opts = TrainOptions {
            halt_after_step: halt,
            ..Default::default()
        };
        let cfg = best_run_config(dir);
        let samples = tiny_samples(16, 1);
        train(
            &cfg,
            &teacher,
            Source::Online(samples),
            eval_rows.clone(),
            start,
            &opts,
            None,
        )
        .unwrap()
    };
    let whole_dir = crate::common::scratch_dir("trainer", "best-whole");
    let whole = run(&whole_dir, Start::Fresh, None);
    let whole_best = whole.best.unwrap();

    let dir = crate::common::scratch_dir("trainer", "best-resumed");
    let first = run(&dir, Start::Fresh, Some(whole_best.step));
    assert_eq!(first.best, Some(whole_best));
    let resumed = run(&dir, Start::Resume, None);
    assert!(
        !resumed.evals.is_empty() && resumed.evals.iter().all(|e| e.step > whole_best.step),
        "evaluations after the best must follow the resume"
    );
    assert_eq!(resumed.best, Some(whole_best));
    let (_, a) = read_checkpoint_head(&whole_dir.join("checkpoints/best")).unwrap();
    let (_, b) = read_checkpoint_head(&dir.join("checkpoints/best")).unwrap();
    for (n, t) in &a {
        assert_eq!(max_abs_diff(t, &b[n]), 0.0, "{n}");
    }

    // A recorded best no evaluation can beat: the resumed run keeps it and writes no new best.
    let dir = crate::common::scratch_dir("trainer", "best-recorded");
    run(&dir, Start::Fresh, Some(3));
    let step3 = dir.join("checkpoints/step-00000003");
    let mut state = state_json(&step3);
    state["best"] = serde_json::json!({"step": 1, "tau_est_default_tree": 1e9});
    std::fs::write(step3.join("state.json"), state.to_string()).unwrap();
    let before = state_json(&dir.join("checkpoints/best"));
    let resumed = run(&dir, Start::Resume, None);
    assert_eq!(
        resumed.best.map(|b| (b.step, b.tau_est_default_tree)),
        Some((1, 1e9))
    );
    assert_eq!(state_json(&dir.join("checkpoints/best")), before);
    assert_eq!(
        state_json(&dir.join("checkpoints/step-00000012"))["best"]["tau_est_default_tree"],
        1e9
    );

    // An older version's checkpoint (no `best` recorded, no best checkpoint): the best of the
    // resumed evaluations is kept.
    let dir = crate::common::scratch_dir("trainer", "best-old");
    run(&dir, Start::Fresh, Some(3));
    let step3 = dir.join("checkpoints/step-00000003");
    let mut state = state_json(&step3);
    assert!(state.as_object_mut().unwrap().remove("best").is_some());
    std::fs::write(step3.join("state.json"), state.to_string()).unwrap();
    std::fs::remove_dir_all(dir.join("checkpoints/best")).unwrap();
    let resumed = run(&dir, Start::Resume, None);
    let want = expected_best(&resumed.evals);
    assert!(want.step >= 4);
    assert_eq!(resumed.best.map(|b| b.step), Some(want.step));
    assert_eq!(state_json(&dir.join("checkpoints/best"))["step"], want.step);
}
