//! Other projects' own loaders run on clover's exports (`make clients` installs them into
//! .venv-clients): the test fails when the client fails.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::{repo_root, scratch_dir};
use crate::speculative::load;
use clover::model::head::DraftHead;
use clover::model::head_config::{HeadConfig, HeadKind};
use clover::training::export_speculators::export_speculators;
use tch::{Device, Kind, Tensor};

/// Runs `scripts/NAME` with the venv's torch and .venv-clients on the path; panics with its
/// output unless it succeeds.
fn run_client(script: &str, args: &[&Path]) -> String {
    let root = repo_root();
    let clients = root.join(".venv-clients");
    assert!(
        clients.join(".stamp").exists(),
        "{} is missing: run `make clients`",
        clients.display()
    );
    let out = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts").join(script))
        .args(args)
        .env("PYTHONPATH", &clients)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("python runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} failed:\n{text}");
    text
}

/// speculators 0.9.0 loads clover's `--format speculators` export of a random EAGLE-3 head on
/// SmolLM2 (layers [2, 15, 27], a seeded 4096-token draft vocabulary, 3 TTT steps) with its own
/// `SpeculatorModel.from_pretrained`, no key missing or unexpected, and on the same teacher
/// states (a chat prompt's) its draft tokens of every TTT step equal clover's.
#[test]
fn speculators_loads_the_eagle3_export_and_drafts_what_clover_drafts() {
    tch::set_num_threads(1);
    let dir = crate::common::smollm2_dir();
    let teacher = load(&dir);
    let mut cfg = HeadConfig::from_teacher(&teacher.config);
    cfg.options.head = HeadKind::Eagle3;
    cfg.options.draft_vocab = Some(4096);
    cfg.options.ttt_steps = Some(3);
    let mut head = DraftHead::new(&teacher, cfg.clone(), 21).unwrap();
    let mut ids: Vec<i64> = clover::rng::seeded(12, || {
        Vec::try_from(Tensor::randperm(
            teacher.config.vocab_size,
            (Kind::Int64, Device::Cpu),
        ))
    })
    .unwrap();
    ids.truncate(4096);
    ids.sort_unstable();
    head.set_draft_vocab(&ids).unwrap();
    let scratch = scratch_dir("clients", "speculators");
    let export = scratch.join("export");
    let embed = teacher.weight("model.embed_tokens.weight").unwrap();
    let verifier = dir.display().to_string();
    export_speculators(
        &cfg,
        &head.saved_tensors(),
        (&dir.join("config.json"), &verifier),
        Some(embed),
        &export,
    )
    .unwrap();
    let case = scratch.join("case");
    write_case(&teacher, &head, &case);
    let said = run_client("speculators_check.py", &[&export, &case]);
    eprintln!("{said}");
    assert!(said.contains("equal clover's"), "{said}");
}

/// The chat prompt's tapped teacher states, the tokens after them, and clover's draft tokens
/// per TTT step (draft-space argmax of step j's rows t < T-j).
fn write_case(teacher: &clover::model::teacher::Teacher, head: &DraftHead, case: &Path) {
    std::fs::create_dir_all(case).unwrap();
    let (prompt, _) = crate::speculative::smollm2_chat_prompt(&crate::common::smollm2_dir());
    let t = prompt.len() as i64;
    let input = Tensor::from_slice(&prompt).unsqueeze(0);
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mut next = prompt[1..].to_vec();
    next.push(0);
    let next = Tensor::from_slice(&next).unsqueeze(0);
    let steps: Vec<Vec<i64>> = tch::no_grad(|| {
        let (_, feats) =
            teacher.forward_tapped(&input, &positions, None, None, head.teacher_layers());
        let tensors = BTreeMap::from([
            ("hidden_states".to_string(), feats.shallow_clone()),
            ("input_ids".to_string(), next.shallow_clone()),
        ]);
        clover::formats::safetensors::write_tensors(&case.join("case.safetensors"), &tensors)
            .unwrap();
        head.depth_outputs(&feats, &next)
            .iter()
            .enumerate()
            .map(|(j, o)| {
                let logits = head.loss_logits_at(j as i64, &o.squeeze_dim(0));
                Vec::try_from(logits.argmax(-1, false)).unwrap()
            })
            .collect()
    });
    let json = serde_json::json!({"ttt_steps": steps.len(), "draft_tokens": steps});
    std::fs::write(case.join("case.json"), json.to_string()).unwrap();
}
