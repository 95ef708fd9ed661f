//! Hostile but fair input: every numeric option of every command given values that cannot be
//! meant must end in a clear error (non-zero exit, the option named, no panic), and config files
//! and job directories with the wrong contents must be refused before any work.

use crate::common::{
    fixture, run_clover as clover, scratch_dir, write_tiny_prepared, write_tiny_train_toml,
};
use clover::data::jobfiles::{publish_dir, DirLock};
use clover::training::config::TrainConfig;
use std::path::Path;

const COUNT_VALUES: &[&str] = &[
    "NaN",
    "inf",
    "-1",
    "0",
    "",
    "1e400",
    "99999999999999999999999",
];
const TEMPERATURE_VALUES: &[&str] = &["NaN", "inf", "-inf", "-1", "", "1e400"];
const FRACTION_VALUES: &[&str] = &["NaN", "inf", "-0.5", "1", "1.5", ""];
const SEED_VALUES: &[&str] = &["NaN", "-1", "", "99999999999999999999999"];

/// Each command with the required arguments it needs to reach option parsing (paths need not
/// exist: a bad option must be refused before any file is read), and its numeric options.
fn commands() -> Vec<(
    Vec<&'static str>,
    Vec<(&'static str, &'static [&'static str])>,
)> {
    let model = ["--model", "/nonexistent/model"];
    vec![
        (
            [&["generate"][..], &model, &["--prompt", "hi"]].concat(),
            vec![
                ("--max-new-tokens", COUNT_VALUES),
                ("--temperature", TEMPERATURE_VALUES),
                ("--seed", SEED_VALUES),
            ],
        ),
        (
            [
                &[
                    "data",
                    "regenerate",
                    "--data",
                    "/nonexistent/c.json",
                    "--out",
                    "/nonexistent/o",
                ][..],
                &model,
            ]
            .concat(),
            vec![
                ("--max-new-tokens", COUNT_VALUES),
                ("--temperature", TEMPERATURE_VALUES),
                ("--batch-size", COUNT_VALUES),
                ("--max-turns", COUNT_VALUES),
                ("--limit", COUNT_VALUES),
                ("--max-batches", COUNT_VALUES),
                ("--max-prompt-tokens", COUNT_VALUES),
                ("--seed", SEED_VALUES),
            ],
        ),
        (
            [
                &[
                    "data",
                    "prepare",
                    "--input",
                    "/nonexistent/c.json",
                    "--out",
                    "/nonexistent/o",
                ][..],
                &model,
            ]
            .concat(),
            vec![
                ("--max-len", &["NaN", "0", "1", "-1", "", "1e400"][..]),
                ("--eval-fraction", FRACTION_VALUES),
                ("--seed", SEED_VALUES),
            ],
        ),
        (
            [
                &[
                    "eval",
                    "--draft",
                    "/nonexistent/h",
                    "--prompts",
                    "/nonexistent/q.jsonl",
                ][..],
                &model,
            ]
            .concat(),
            vec![
                ("--temperature", TEMPERATURE_VALUES),
                ("--max-new-tokens", COUNT_VALUES),
                ("--limit", COUNT_VALUES),
                ("--per-category", COUNT_VALUES),
                ("--seed", SEED_VALUES),
                ("--warmup", SEED_VALUES),
            ],
        ),
        (
            [
                &[
                    "distill",
                    "--data",
                    "/nonexistent/d",
                    "--out",
                    "/nonexistent/o",
                ][..],
                &model,
            ]
            .concat(),
            vec![
                ("--batch-tokens", COUNT_VALUES),
                ("--max-shards", COUNT_VALUES),
                (
                    "--shard",
                    &["", "1/1", "2/1", "a/b", "-1/2", "0/0", "1"][..],
                ),
                ("--dtype", &["", "f64", "int8"][..]),
                ("--device", &["", "gpu", "cuda:x", "cuda:99"][..]),
            ],
        ),
        (
            [&["bench-train"][..], &model].concat(),
            vec![
                ("--steps", COUNT_VALUES),
                ("--batch", COUNT_VALUES),
                ("--seq-len", &["NaN", "0", "1", "-1", "", "1e400"][..]),
                ("--num-depths", COUNT_VALUES),
                (
                    "--loss-chunk",
                    &["NaN", "-1", "", "1.5", "99999999999999999999999"][..],
                ),
                ("--device", &["", "gpu", "cuda:x"][..]),
            ],
        ),
        (
            vec![
                "init-random",
                "--like",
                "smollm2-135m",
                "--out",
                "/nonexistent/m",
            ],
            vec![
                ("--layers", COUNT_VALUES),
                ("--like", &["", "gpt2", "vicuna"][..]),
            ],
        ),
        (
            vec![
                "data",
                "import-sharegpt",
                "--input",
                "/nonexistent/s.json",
                "--out",
                "/nonexistent/t.jsonl",
                "--held-out",
                "/nonexistent/h.jsonl",
            ],
            vec![
                ("--held-out-fraction", FRACTION_VALUES),
                ("--held-out-max", &["NaN", "inf", "-1", "", "1e400"][..]),
                ("--max-conversations", COUNT_VALUES),
                ("--max-turns", COUNT_VALUES),
                ("--seed", SEED_VALUES),
            ],
        ),
        (
            vec![
                "data",
                "tasks",
                "--out",
                "/nonexistent/tasks",
                "--mt-bench",
                "/nonexistent/q.jsonl",
            ],
            vec![
                ("--per-task", COUNT_VALUES),
                ("--max-turns", COUNT_VALUES),
                ("--max-prompt-chars", COUNT_VALUES),
                ("--seed", SEED_VALUES),
            ],
        ),
        (
            [&["bench", "--out", "/nonexistent/b.json"][..], &model].concat(),
            vec![
                ("--prefill-tokens", COUNT_VALUES),
                ("--decode-tokens", COUNT_VALUES),
                ("--distill-samples", COUNT_VALUES),
            ],
        ),
    ]
}

#[test]
fn every_numeric_option_refuses_values_that_cannot_be_meant_without_panicking() {
    let mut runs = 0;
    for (base, options) in commands() {
        for (option, values) in options {
            for value in values {
                let mut args = base.clone();
                args.push(option);
                args.push(value);
                let (code, text) = clover(&args);
                runs += 1;
                assert!(code != 0, "clover {args:?} exited 0:\n{text}");
                assert!(
                    !text.contains("panicked"),
                    "clover {args:?} panicked:\n{text}"
                );
                assert!(
                    text.contains("error"),
                    "clover {args:?} failed without an error message:\n{text}"
                );
            }
        }
    }
    assert!(runs > 150, "only {runs} hostile runs");
}

#[test]
fn a_bad_temperature_is_named_with_its_valid_range() {
    let (code, text) = clover(&[
        "generate",
        "--model",
        "/nonexistent",
        "--prompt",
        "hi",
        "--temperature",
        "NaN",
    ]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("--temperature") && text.contains(">= 0"),
        "{text}"
    );
}

/// A valid offline config, then one bad value at a time: each is refused at load, naming the key.
#[test]
fn training_config_refuses_values_out_of_range_naming_each() {
    let base =
        "model_dir = \"m\"\ndata_dir = \"d\"\nout_dir = \"o\"\ndevice = \"cpu\"\nmax_steps = 10\n";
    assert!(TrainConfig::from_toml(base, "base.toml").is_ok());
    let cases = [
        ("batch_tokens = 0", "batch_tokens"),
        ("batch_tokens = 1", "batch_tokens"),
        ("max_len = 1", "max_len"),
        ("max_steps = 0", "max_steps"),
        ("epochs = 0\nmax_steps = 3", "epochs"),
        ("lr = -1.0", "lr"),
        ("lr = 0.0", "lr"),
        ("lr = nan", "lr"),
        ("betas = [1.0, 0.95]", "betas"),
        ("betas = [0.9, -0.1]", "betas"),
        ("weight_decay = -0.01", "weight_decay"),
        ("adam_eps = 0.0", "adam_eps"),
        ("clip_value = 0.0", "clip_value"),
        ("clip_value = inf", "clip_value"),
        ("warmup_steps = 11", "warmup_steps"),
        ("schedule_steps = 0", "schedule_steps"),
        ("num_depths = 0", "num_depths"),
        ("num_layers = 0", "num_layers"),
        ("decay = 0.0", "decay"),
        ("decay = 1.5", "decay"),
        ("draft_rope_theta = -1.0", "draft_rope_theta"),
        ("init_from_layer = -1", "init_from_layer"),
        ("keep_last = 0", "keep_last"),
        ("save_every = 0", "save_every"),
        ("eval_samples = 0", "eval_samples"),
        ("bucket_window = 0", "bucket_window"),
        ("max_train_samples = 0", "max_train_samples"),
        ("num_dephts = 3", "num_dephts"),
        ("tau_chain_depth = 0", "tau_chain_depth"),
        ("tau_chain_depth = 33", "tau_chain_depth"),
        ("head = \"medusa\"\ntau_chain_depth = 6", "tau_chain_depth"),
    ];
    for (line, key) in cases {
        // A later key of the same name would be a TOML error: put the case's keys first.
        let text = format!(
            "{line}\n{}",
            base.replace(
                "max_steps = 10\n",
                if line.contains("max_steps") {
                    ""
                } else {
                    "max_steps = 10\n"
                }
            )
        );
        let err = TrainConfig::from_toml(&text, "bad.toml")
            .err()
            .unwrap_or_else(|| panic!("{line:?} was accepted"));
        let msg = format!("{err:#}");
        assert!(
            msg.contains("bad.toml") && msg.contains(key),
            "{line:?}: {msg}"
        );
    }
    // Several problems are reported together.
    let err = TrainConfig::from_toml(&format!("lr = -1.0\nkeep_last = 0\n{base}"), "two.toml")
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("lr") && msg.contains("keep_last"), "{msg}");
}

#[test]
fn a_failed_directory_write_leaves_nothing_behind_and_the_old_one_intact() {
    let root = scratch_dir("hostile", "publish");
    let dir = root.join("head");
    publish_dir(&dir, |tmp| Ok(std::fs::write(tmp.join("a"), "first")?)).unwrap();
    let err = publish_dir(&dir, |tmp| {
        std::fs::write(tmp.join("a"), "half")?;
        anyhow::bail!("disk full (simulated)")
    })
    .unwrap_err();
    assert!(format!("{err}").contains("disk full"));
    assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "first");
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        vec!["head".to_string()],
        "temporary directories left behind"
    );
    publish_dir(&dir, |tmp| Ok(std::fs::write(tmp.join("b"), "second")?)).unwrap();
    assert!(!dir.join("a").exists() && dir.join("b").exists());
}

#[test]
fn two_runs_of_one_worker_cannot_share_an_output_directory() {
    let root = scratch_dir("hostile", "lock");
    let first = DirLock::acquire(&root, "0-of-1").unwrap();
    let err = DirLock::acquire(&root, "0-of-1")
        .err()
        .expect("second lock taken");
    assert!(
        format!("{err}").contains(&root.display().to_string()),
        "{err}"
    );
    // Other workers of the same job share the directory.
    let _other = DirLock::acquire(&root, "1-of-2").unwrap();
    drop(first);
    DirLock::acquire(&root, "0-of-1").unwrap();
}

/// Distill into a directory another process is writing: refused at once, naming the directory.
#[test]
fn distill_refuses_an_output_another_run_holds() {
    let root = scratch_dir("hostile", "distill-lock");
    let out = root.join("cache");
    let _held = DirLock::acquire(&out, "0-of-1").unwrap();
    write_tiny_prepared(&root.join("data"));
    let (code, text) = clover(&[
        "distill",
        "--data",
        root.join("data").to_str().unwrap(),
        "--model",
        fixture("tiny-llama-tied").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("another clover process"), "{text}");
}

/// A prompt longer than the context minus the new tokens is refused at once, before any prefill
/// (SmolLM2's context is 8,192 positions; 10,000 words are well past it).
#[test]
fn a_prompt_past_the_context_is_refused_at_once() {
    let prompt = "word ".repeat(10_000);
    let model = crate::common::smollm2_dir();
    let (code, text) = clover(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &prompt,
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("context of 8192 positions"), "{text}");
}

/// A long job whose output goes to a file still shows progress: plain lines, not a hidden bar.
#[test]
fn a_long_job_prints_plain_progress_lines_when_not_on_a_terminal() {
    let root = scratch_dir("hostile", "progress");
    write_tiny_prepared(&root.join("data"));
    let (code, text) = clover(&[
        "distill",
        "--data",
        root.join("data").to_str().unwrap(),
        "--model",
        fixture("tiny-llama-tied").to_str().unwrap(),
        "--out",
        root.join("cache").to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 0, "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("[distill (shards)] 1/1 (100.0%)"))
        .unwrap_or_else(|| panic!("no final progress line in:\n{text}"));
    assert!(line.contains("elapsed") && line.ends_with("done"), "{line}");
}

/// A distillation cache must come from the teacher and data a run trains on: refused before the
/// first step, naming the cache and both values.
#[test]
fn a_cache_from_another_teacher_or_hidden_size_is_refused_before_training() {
    let root = scratch_dir("hostile", "cache");
    let data = root.join("data");
    write_tiny_prepared(&data);
    let cache = root.join("cache");
    let (code, text) = clover(&[
        "distill",
        "--data",
        data.to_str().unwrap(),
        "--model",
        fixture("tiny-llama-tied").to_str().unwrap(),
        "--out",
        cache.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 0, "{text}");
    let config = |model: &Path, name: &str| {
        let path = root.join(name);
        write_tiny_train_toml(&path, model, &data, Some(&cache), &root.join("out"));
        path
    };
    let other = config(&fixture("tiny-llama-untied"), "other.toml");
    let (code, text) = clover(&["train", "--config", other.to_str().unwrap()]);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("distill.json")
            && text.contains("tiny-llama-tied")
            && text.contains("tiny-llama-untied"),
        "{text}"
    );
    assert!(!root.join("out/metrics.jsonl").exists(), "a step ran");
    // A manifest that claims another hidden size: the cache is named with what it holds.
    let manifest = cache.join("distill.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["hidden_size"] = 1152.into();
    std::fs::write(&manifest, json.to_string()).unwrap();
    let same = config(&fixture("tiny-llama-tied"), "same.toml");
    let (code, text) = clover(&["train", "--config", same.to_str().unwrap()]);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("hidden size 1152") && text.contains("distill.json"),
        "{text}"
    );
}
