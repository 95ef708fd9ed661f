//! A user's files are never lost: every command that writes refuses an output that is one of its
//! inputs or holds one, never replaces what it did not write, takes `--overwrite` to replace its
//! own previous output, and never names a non-finite checkpoint "good". Each case checks the
//! input is intact afterwards, and a control shows the same command succeeding where it should.

use crate::common::{fixture, run_clover as clover, scratch_dir, tiny_samples};
use clover::data::jobfiles::{publish_dir, DirLock};
use clover::data::shards::{write_samples, Split};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Every file under `dir` with its bytes: "intact" means this is unchanged.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Prepared data of tiny-fixture rows, and a training config over it writing `root/run`.
fn tiny_job(root: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let data = root.join("prep");
    if !data.exists() {
        write_samples(&data, Split::Train, &tiny_samples(12, 3)).unwrap();
        write_samples(&data, Split::Eval, &tiny_samples(2, 4)).unwrap();
    }
    let run = root.join("run");
    let config = root.join("train.toml");
    std::fs::write(
        &config,
        format!(
            "{extra}\nmodel_dir = \"{}\"\ndata_dir = \"{}\"\nout_dir = \"{}\"\ndevice = \"cpu\"\n\
             num_depths = 2\nbatch_tokens = 48\nbucket_window = 8\neval_every = 0\nseed = 1\n\
             progress = false\n",
            fixture("tiny-llama-untied").display(),
            data.display(),
            run.display()
        ),
    )
    .unwrap();
    (config, run)
}

fn train(config: &Path, args: &[&str]) -> (i32, String) {
    let mut all = vec!["train", "--config", s(config)];
    all.extend_from_slice(args);
    clover(&all)
}

fn assert_refused(code: i32, text: &str, needles: &[&str]) {
    assert_ne!(code, 0, "accepted:\n{text}");
    assert!(!text.contains("panicked"), "panicked:\n{text}");
    for n in needles {
        assert!(text.contains(n), "no {n:?} in:\n{text}");
    }
}

/// A 2-step run with a checkpoint at each step.
fn trained_run(root: &Path) -> (PathBuf, PathBuf) {
    let (config, run) = tiny_job(root, "max_steps = 2\nsave_every = 1\nkeep_last = 5");
    let (code, text) = train(&config, &[]);
    assert_eq!(code, 0, "{text}");
    (config, run)
}

#[test]
fn export_never_writes_over_its_run_its_checkpoint_or_foreign_data() {
    let root = scratch_dir("outputs", "export");
    let (_, run) = trained_run(&root);
    let before = snapshot(&run);
    let latest = run.join("latest");
    let checkpoint = run.join("checkpoints/step-00000002");
    for (out, relation) in [(&run, "holds"), (&checkpoint, "is")] {
        let (code, text) = clover(&["export", "--checkpoint", s(&latest), "--out", s(out)]);
        assert_refused(code, &text, &[relation, "--checkpoint"]);
        assert_eq!(snapshot(&run), before, "export {out:?} changed the run");
    }
    // A directory of the user's (here prepared data) is never replaced, --overwrite or not.
    let prep = root.join("prep");
    let data = snapshot(&prep);
    for extra in [&[][..], &["--overwrite"][..]] {
        let mut args = vec!["export", "--checkpoint", s(&latest), "--out", s(&prep)];
        args.extend_from_slice(extra);
        let (code, text) = clover(&args);
        assert_refused(code, &text, &["did not write", "train-00000.parquet"]);
        assert_eq!(snapshot(&prep), data, "export replaced the prepared data");
    }
    // Control: a new directory takes the export; a second export there needs --overwrite.
    let head = root.join("head");
    let args = ["export", "--checkpoint", s(&latest), "--out", s(&head)];
    let (code, text) = clover(&args);
    assert_eq!(code, 0, "{text}");
    let (code, text) = clover(&args);
    assert_refused(code, &text, &["previous `clover export`", "--overwrite"]);
    let (code, text) = clover(&[&args[..], &["--overwrite"]].concat());
    assert_eq!(code, 0, "{text}");
    assert!(head.join("model.safetensors").exists());
}

#[test]
fn report_and_import_outputs_never_replace_their_inputs() {
    let root = scratch_dir("outputs", "files");
    let questions = root.join("q.jsonl");
    std::fs::write(&questions, "{\"question_id\": 1, \"turns\": [\"hi\"]}\n").unwrap();
    let (code, text) = clover(&[
        "eval",
        "--model",
        s(&fixture("tiny-llama-untied")),
        "--draft",
        s(&root.join("nohead")),
        "--prompts",
        s(&questions),
        "--report",
        s(&questions),
        "--overwrite",
    ]);
    assert_refused(code, &text, &["--report", "is the input --prompts"]);
    let chats = root.join("chats.json");
    std::fs::write(&chats, "[]").unwrap();
    let import = |out: &Path| {
        clover(&[
            "data",
            "import-chitchat",
            "--input",
            s(&chats),
            "--out",
            s(out),
        ])
    };
    let (code, text) = import(&chats);
    assert_refused(code, &text, &["--out", "is the input --input"]);
    assert_eq!(
        std::fs::read_to_string(&questions).unwrap(),
        "{\"question_id\": 1, \"turns\": [\"hi\"]}\n"
    );
    assert_eq!(std::fs::read_to_string(&chats).unwrap(), "[]");
    // An existing file that is no input is replaced only with --overwrite.
    let other = root.join("other.json");
    std::fs::write(&other, "mine").unwrap();
    let (code, text) = import(&other);
    assert_refused(code, &text, &["exists", "--overwrite"]);
    assert_eq!(std::fs::read_to_string(&other).unwrap(), "mine");
}

/// An unwritable --report fails at once, before the teacher is even read.
#[test]
fn an_unwritable_report_is_refused_before_the_run() {
    let root = scratch_dir("outputs", "unwritable");
    let file = root.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let report = file.join("eval.json");
    let (code, text) = clover(&[
        "eval",
        "--model",
        "/nonexistent/model",
        "--draft",
        "/nonexistent/head",
        "--prompts",
        "/nonexistent/q.jsonl",
        "--report",
        s(&report),
    ]);
    assert_refused(code, &text, &["--report", "cannot create"]);
    assert!(
        !text.contains("/nonexistent/model"),
        "the run started:\n{text}"
    );
}

#[test]
fn a_fresh_run_never_mixes_with_or_prunes_another_run() {
    let root = scratch_dir("outputs", "fresh");
    let (config, run) = tiny_job(&root, "max_steps = 6\nsave_every = 2\nkeep_last = 2");
    let (code, text) = train(&config, &[]);
    assert_eq!(code, 0, "{text}");
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    let before = snapshot(&run);
    let (short, _) = tiny_job(&root, "max_steps = 2\nsave_every = 2\nkeep_last = 2");
    let (code, text) = train(&short, &[]);
    assert_refused(
        code,
        &text,
        &["holds another run", "--resume", "--overwrite"],
    );
    assert_eq!(
        snapshot(&run),
        before,
        "a refused run changed the directory"
    );
    // --overwrite starts over: only the run's own entries go, the user's file stays.
    let (code, text) = train(&short, &["--overwrite"]);
    assert_eq!(code, 0, "{text}");
    let checkpoints: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(checkpoints, vec!["step-00000002"]);
    assert_eq!(
        std::fs::read_to_string(run.join("notes.txt")).unwrap(),
        "mine"
    );
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
}

#[test]
fn overwrite_never_removes_a_directory_clover_train_did_not_write() {
    let root = scratch_dir("outputs", "foreign-run");
    let (config, run) = tiny_job(&root, "max_steps = 2\nsave_every = 2");
    // Someone else's `checkpoints` directory, and their file beside it.
    std::fs::create_dir_all(run.join("checkpoints/step-00000009")).unwrap();
    std::fs::write(run.join("thesis.tex"), "mine").unwrap();
    let before = snapshot(&run);
    let (code, text) = train(&config, &["--overwrite"]);
    assert_refused(code, &text, &["thesis.tex", "does not write"]);
    assert_eq!(snapshot(&run), before);
}

#[test]
fn two_trainings_cannot_share_an_out_dir() {
    let root = scratch_dir("outputs", "train-lock");
    let (config, run) = tiny_job(&root, "max_steps = 1");
    let _held = DirLock::acquire(&run, "train").unwrap();
    let (code, text) = train(&config, &[]);
    assert_refused(code, &text, &["another clover process"]);
    assert!(!run.join("metrics.jsonl").exists());
}

/// lr = 1e6 blows the weights up within a few steps: the run stops before it applies a
/// non-finite update, and every checkpoint on disk holds finite weights, every metric a number.
#[test]
fn a_diverging_run_never_saves_or_logs_a_non_finite_value() {
    let root = scratch_dir("outputs", "diverge");
    let (config, run) = tiny_job(
        &root,
        "max_steps = 30\nsave_every = 1\nkeep_last = 100\nlr = 1e6\nwarmup_steps = 0\n\
         clip_value = 1e30",
    );
    let (code, text) = train(&config, &[]);
    assert_refused(code, &text, &["non-finite", "last good checkpoint"]);
    let saved: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for ck in &saved {
        for (name, t) in Tensor::read_safetensors(ck.join("head.safetensors")).unwrap() {
            let bad = t
                .isfinite()
                .logical_not()
                .sum(tch::Kind::Int64)
                .int64_value(&[]);
            assert_eq!(
                bad,
                0,
                "{}: {name} holds {bad} non-finite values",
                ck.display()
            );
        }
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    assert!(
        !metrics.contains("null"),
        "a metric was not a number:\n{metrics}"
    );
    // The message names the checkpoint it keeps, and that one exists.
    if let Some(last) = saved.iter().max() {
        assert!(text.contains(s(last)), "{text}");
    }
}

/// Writes `value` into the first float tensor of a safetensors file.
fn poison(file: &Path, value: f64) -> String {
    let mut tensors = Tensor::read_safetensors(file).unwrap();
    let (name, t) = tensors
        .iter_mut()
        .find(|(_, t)| t.is_floating_point())
        .unwrap();
    let _ = t.view(-1).get(0).fill_(value);
    let name = name.clone();
    Tensor::write_safetensors(&tensors, file).unwrap();
    name
}

#[test]
fn a_non_finite_weight_is_refused_at_export_resume_and_load() {
    let root = scratch_dir("outputs", "poison");
    let (config, run) = trained_run(&root);
    let head = root.join("head");
    let (code, text) = clover(&["export", "--checkpoint", s(&run), "--out", s(&head)]);
    assert_eq!(code, 0, "control: the good checkpoint exports\n{text}");
    let ck = run.join("checkpoints/step-00000002");
    let name = poison(&ck.join("head.safetensors"), f64::NAN);
    let (code, text) = clover(&[
        "export",
        "--checkpoint",
        s(&ck),
        "--out",
        s(&root.join("head2")),
    ]);
    assert_refused(code, &text, &["non-finite", &name]);
    assert!(!root.join("head2").exists());
    let (code, text) = train(&config, &["--resume", "--set", "max_steps=3"]);
    assert_refused(code, &text, &["non-finite", &name]);
    poison(&head.join("model.safetensors"), f64::INFINITY);
    let err = load_tiny_head(&head)
        .err()
        .expect("a head with an inf weight loaded");
    assert!(format!("{err:#}").contains("non-finite"), "{err:#}");
}

/// `model::head::load_head` as `eval` and `generate` call it, next to the tiny teacher.
fn load_tiny_head(dir: &Path) -> anyhow::Result<clover::model::head::DraftHead> {
    let teacher = crate::common::tiny_teacher(tch::Kind::Float);
    clover::model::head::load_head(dir, &teacher)
}

#[test]
fn resuming_on_changed_data_is_refused() {
    let root = scratch_dir("outputs", "fingerprint");
    let (config, _) = trained_run(&root);
    let prep = root.join("prep");
    std::fs::remove_dir_all(&prep).unwrap();
    write_samples(&prep, Split::Train, &tiny_samples(12, 99)).unwrap();
    write_samples(&prep, Split::Eval, &tiny_samples(2, 4)).unwrap();
    let (code, text) = train(&config, &["--resume", "--set", "max_steps=3"]);
    assert_refused(code, &text, &["training data changed", "data fingerprint"]);
    // Control: the data it was trained on resumes.
    std::fs::remove_dir_all(&prep).unwrap();
    write_samples(&prep, Split::Train, &tiny_samples(12, 3)).unwrap();
    write_samples(&prep, Split::Eval, &tiny_samples(2, 4)).unwrap();
    let (code, text) = train(&config, &["--resume", "--set", "max_steps=3"]);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn runs_that_would_change_nothing_or_write_nowhere_are_refused() {
    let root = scratch_dir("outputs", "no-op");
    let (config, _) = tiny_job(&root, "max_steps = 1\nwarmup_steps = 1");
    let (code, text) = train(&config, &[]);
    assert_refused(code, &text, &["warmup_steps", "below max_steps"]);
    let (config, _) = tiny_job(&root, "max_steps = 2");
    let (code, text) = train(&config, &["--set", "out_dir= "]);
    assert_refused(code, &text, &["out_dir", "is empty"]);
    // Rows whose loss mask is all zero: nothing to learn.
    let zero = root.join("zero");
    let mut rows = tiny_samples(4, 1);
    for r in &mut rows {
        r.loss_mask.iter_mut().for_each(|m| *m = 0);
    }
    write_samples(&zero, Split::Train, &rows).unwrap();
    let (code, text) = train(
        &config,
        &["--set", &format!("data_dir=\"{}\"", zero.display())],
    );
    assert_refused(code, &text, &["no training row has a trained token"]);
}

#[test]
fn a_training_checkpoint_given_as_a_head_says_to_export_it() {
    let root = scratch_dir("outputs", "ck-as-head");
    let (_, run) = trained_run(&root);
    for dir in [run.clone(), run.join("checkpoints/step-00000002")] {
        let err = load_tiny_head(&dir)
            .err()
            .expect("a checkpoint loaded as a head");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("training checkpoint") && msg.contains("clover export --checkpoint"),
            "{msg}"
        );
    }
}

/// A writer killed mid-publish leaves `.tmp-NAME-PID` (and, between its two renames, the old
/// directory as `.old-NAME-PID`): the next publish removes the first and restores the second.
#[test]
fn leftovers_of_a_killed_writer_are_cleaned_or_restored() {
    let root = scratch_dir("outputs", "leftovers");
    // No process has this id (above Linux's largest pid_max, 2^22).
    let dead = 4_999_999;
    let tmp = root.join(format!(".tmp-a-{dead}"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("half"), "x").unwrap();
    let old = root.join(format!(".old-b-{dead}"));
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("only copy"), "precious").unwrap();
    publish_dir(&root.join("a"), |d| Ok(std::fs::write(d.join("f"), "new")?)).unwrap();
    assert!(
        !tmp.exists(),
        "the dead writer's temporary directory is left"
    );
    publish_dir(&root.join("b"), |d| {
        // By now the old directory is back in its place.
        assert!(root.join("b/only copy").exists());
        Ok(std::fs::write(d.join("f"), "new")?)
    })
    .unwrap();
    assert!(!old.exists());
}

#[test]
fn distill_and_prepare_never_take_a_foreign_directory() {
    let root = scratch_dir("outputs", "data-dirs");
    let (_, _) = tiny_job(&root, "");
    let mine = root.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("results.csv"), "1,2").unwrap();
    let distill_into = |out: &Path| {
        clover(&[
            "distill",
            "--data",
            s(&root.join("prep")),
            "--model",
            s(&fixture("tiny-llama-tied")),
            "--out",
            s(out),
            "--device",
            "cpu",
        ])
    };
    let (code, text) = distill_into(&mine);
    assert_refused(code, &text, &["results.csv", "did not write"]);
    let (code, text) = distill_into(&root.join("prep/cache"));
    assert_refused(code, &text, &["lies inside the input --data"]);
    assert_eq!(
        std::fs::read_to_string(mine.join("results.csv")).unwrap(),
        "1,2"
    );
}

/// `clover` run from `dir`.
fn clover_in(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(crate::common::clover_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A cache distilled with relative paths trains from another working directory: the manifest
/// records where the data and teacher are, not how they were spelled.
#[test]
fn a_cache_made_with_relative_paths_trains_from_any_directory() {
    let root = scratch_dir("outputs", "relative-cache");
    let (config, _) = tiny_job(&root, "max_steps = 1");
    let teacher = root.join("teacher");
    std::os::unix::fs::symlink(fixture("tiny-llama-untied"), &teacher).unwrap();
    let (code, text) = clover_in(
        &root,
        &[
            "distill", "--data", "prep", "--model", "teacher", "--out", "cache", "--device", "cpu",
        ],
    );
    assert_eq!(code, 0, "{text}");
    let elsewhere = root.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let cache = format!("distill_cache=\"{}\"", root.join("cache").display());
    let model = format!("model_dir=\"{}\"", teacher.display());
    let (code, text) = clover_in(
        &elsewhere,
        &[
            "train",
            "--config",
            s(&config),
            "--set",
            &cache,
            "--set",
            &model,
        ],
    );
    assert_eq!(code, 0, "{text}");
}

/// Rows longer than the teacher's context (the tiny fixture's is 256 positions) are refused by
/// distill and train, naming the row and both numbers; `max_len` within the context trains.
#[test]
fn rows_past_the_teachers_context_are_refused() {
    let root = scratch_dir("outputs", "context");
    let data = root.join("prep");
    let mut rows = tiny_samples(4, 2);
    rows[1].input_ids = (0..300).map(|i| i % 90 + 3).collect();
    rows[1].loss_mask = vec![1; 300];
    write_samples(&data, Split::Train, &rows).unwrap();
    write_samples(&data, Split::Eval, &tiny_samples(2, 4)).unwrap();
    let (code, text) = clover(&[
        "distill",
        "--data",
        s(&data),
        "--model",
        s(&fixture("tiny-llama-tied")),
        "--out",
        s(&root.join("cache")),
        "--device",
        "cpu",
    ]);
    assert_refused(code, &text, &["\"s1\"", "300 tokens", "context of 256"]);
    let (config, _) = tiny_job(&root, "max_steps = 1\nmax_len = 512");
    let (code, text) = train(&config, &["--set", "batch_tokens=1024"]);
    assert_refused(code, &text, &["300 tokens", "context of 256", "max_len"]);
    let (code, text) = train(
        &config,
        &["--set", "batch_tokens=1024", "--set", "max_len=256"],
    );
    assert_eq!(code, 0, "{text}");
}
