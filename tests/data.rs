//! `data prepare`, the shard reader/writer, the ShareGPT reader and the chitchat import.

use crate::common::fixture_model_dir;
use clover::data::chitchat::import_chitchat;
use clover::data::prepare::{prepare, split_of, Manifest, PrepareOptions};
use clover::data::shards::{read_split, write_samples, Sample, Split};
use clover::data::sharegpt::{read_conversations, Conversation, SkipReason};
use clover::formats::chat::{ChatTokenizer, Message, Role};
use std::path::Path;

fn args(input: &Path, out: &Path) -> PrepareOptions {
    PrepareOptions {
        input: input.to_path_buf(),
        model: fixture_model_dir(),
        template: clover::formats::chat::TemplateName::Chatml,
        no_system_prompt: false,
        out: out.to_path_buf(),
        max_len: 2048,
        eval_fraction: 0.3,
        seed: 7,
        held_out: None,
    }
}

fn sharegpt(id: &str, turns: &[(&str, &str)]) -> serde_json::Value {
    let messages: Vec<_> = turns
        .iter()
        .map(|(from, value)| serde_json::json!({"from": from, "value": value}))
        .collect();
    serde_json::json!({"id": id, "conversations": messages})
}

fn good_records(n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let q = format!("question {i}?");
            let a = format!("answer {i}.");
            sharegpt(
                &format!("c{i}"),
                &[("human", &q), ("gpt", &a), ("human", "more"), ("gpt", "ok")],
            )
        })
        .collect()
}

#[test]
fn prepare_round_trip_matches_the_tokenizer() {
    let dir = crate::common::scratch_dir("data", "round-trip");
    let input = dir.join("in.json");
    std::fs::write(
        &input,
        serde_json::to_string_pretty(&good_records(40)).unwrap(),
    )
    .unwrap();
    let out = dir.join("out");
    let summary = prepare(&args(&input, &out)).unwrap();
    assert_eq!((summary.read, summary.kept), (40, 40));
    assert!(summary.skipped.is_empty(), "{:?}", summary.skipped);
    assert!(summary.train > 0 && summary.eval > 0, "{summary:?}");

    let chat = ChatTokenizer::from_model_dir(&fixture_model_dir(), Some("chatml")).unwrap();
    let (conversations, _) = read_conversations(&input).unwrap();
    let mut samples = read_split(&out, Split::Train).unwrap();
    samples.extend(read_split(&out, Split::Eval).unwrap());
    samples.sort_by_key(|s| s.id[1..].parse::<usize>().unwrap());
    assert_eq!(samples.len(), 40);
    let mut tokens = 0;
    for (sample, conversation) in samples.iter().zip(&conversations) {
        let (ids, mask) = chat.encode_conversation(&conversation.messages).unwrap();
        assert_eq!(sample.id, conversation.id);
        assert_eq!(sample.input_ids, ids);
        assert_eq!(sample.loss_mask, mask);
        tokens += ids.len();
    }
    assert_eq!(summary.tokens, tokens);

    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest.summary, summary);
    assert_eq!(manifest.train_shards, vec!["train-00000.parquet"]);
    assert_eq!(manifest.vocab_size, chat.vocab_size());
}

#[test]
fn write_then_read_split_is_identity() {
    let dir = crate::common::scratch_dir("data", "write-read");
    let samples = vec![
        Sample {
            id: "a".into(),
            input_ids: vec![1, 2, 49151],
            loss_mask: vec![0, 1, 1],
        },
        Sample {
            id: "ünï".into(),
            input_ids: vec![],
            loss_mask: vec![],
        },
        Sample {
            id: "c".into(),
            input_ids: vec![7],
            loss_mask: vec![0],
        },
    ];
    write_samples(&dir, Split::Eval, &samples).unwrap();
    assert_eq!(read_split(&dir, Split::Eval).unwrap(), samples);
    assert!(read_split(&dir, Split::Train).unwrap().is_empty());
    // Rewriting a split replaces its old shards.
    write_samples(&dir, Split::Eval, &samples[..1]).unwrap();
    assert_eq!(read_split(&dir, Split::Eval).unwrap(), samples[..1]);
}

#[test]
fn split_is_deterministic_and_follows_the_fraction() {
    let ids: Vec<String> = (0..20_000).map(|i| format!("id-{i}")).collect();
    let eval_count = |seed| {
        ids.iter()
            .filter(|id| split_of(id, seed, 0.05) == Split::Eval)
            .count()
    };
    let a = eval_count(0);
    assert_eq!(a, eval_count(0));
    assert!(
        (800..1200).contains(&a),
        "{a} of 20000 in eval at fraction 0.05"
    );
    let differ = ids
        .iter()
        .filter(|id| split_of(id, 0, 0.05) != split_of(id, 1, 0.05))
        .count();
    assert!(differ > 0, "the seed changes the split");
    assert!(ids.iter().all(|id| split_of(id, 3, 0.0) == Split::Train));
    assert!(ids.iter().all(|id| split_of(id, 3, 1.0) == Split::Eval));

    // The same input and seed give the same shards.
    let dir = crate::common::scratch_dir("data", "split-twice");
    let input = dir.join("in.json");
    std::fs::write(&input, serde_json::to_string(&good_records(30)).unwrap()).unwrap();
    let (one, two) = (dir.join("one"), dir.join("two"));
    prepare(&args(&input, &one)).unwrap();
    prepare(&args(&input, &two)).unwrap();
    for split in [Split::Train, Split::Eval] {
        assert_eq!(
            read_split(&one, split).unwrap(),
            read_split(&two, split).unwrap()
        );
    }
}

#[test]
fn malformed_records_are_skipped_and_counted() {
    let dir = crate::common::scratch_dir("data", "malformed");
    let input = dir.join("in.jsonl");
    let long_answer = "word ".repeat(400);
    let mut lines: Vec<Vec<u8>> = vec![
        sharegpt("good", &[("human", "hi"), ("gpt", "hello")]),
        sharegpt("role", &[("human", "hi"), ("narrator", "meanwhile")]),
        sharegpt("empty", &[]),
        sharegpt("lead", &[("gpt", "I speak first"), ("human", "hi"), ("gpt", "hello")]),
        sharegpt("only-gpt", &[("gpt", "alone")]),
        sharegpt("long", &[("human", "go"), ("gpt", &long_answer)]),
        sharegpt("no-answer", &[("human", "anyone?")]),
        sharegpt("good", &[("human", "again"), ("gpt", "dup")]),
        serde_json::json!({"id": "roles", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
    ]
    .iter()
    .map(|v| serde_json::to_vec(v).unwrap())
    .collect();
    lines.push(b"{\"id\": \"bad-utf8\", \"conversations\": [{\"from\": \"human\", \"value\": \"\xff\xfe\"}]}".to_vec());
    lines.push(b"{\"id\": \"cut\", \"conversations\": [".to_vec());
    std::fs::write(&input, lines.join(&b'\n')).unwrap();

    let (conversations, skipped) = read_conversations(&input).unwrap();
    let reason_of = |id: &str| {
        skipped
            .iter()
            .find(|s| s.id.as_deref() == Some(id))
            .map(|s| s.reason)
    };
    assert_eq!(reason_of("role"), Some(SkipReason::UnknownRole));
    assert_eq!(reason_of("empty"), Some(SkipReason::EmptyConversation));
    assert_eq!(reason_of("lead"), Some(SkipReason::LeadingAssistant));
    assert_eq!(reason_of("only-gpt"), Some(SkipReason::LeadingAssistant));
    assert_eq!(reason_of("good"), Some(SkipReason::DuplicateId));
    let utf8 = skipped
        .iter()
        .find(|s| s.reason == SkipReason::InvalidUtf8)
        .unwrap();
    assert_eq!(utf8.position, "line 10");
    let cut = skipped
        .iter()
        .find(|s| s.reason == SkipReason::Malformed)
        .unwrap();
    assert_eq!(cut.position, "line 11");
    let message = utf8.to_string();
    assert!(
        message.contains("line 10") && message.contains("invalid UTF-8"),
        "{message}"
    );
    let unknown = skipped
        .iter()
        .find(|s| s.reason == SkipReason::UnknownRole)
        .unwrap()
        .to_string();
    assert!(
        unknown.contains("\"narrator\"") && unknown.contains("message 1"),
        "{unknown}"
    );
    let lead = conversations.iter().find(|c| c.id == "lead").unwrap();
    assert_eq!(
        lead.messages[0],
        Message::new(Role::User, "hi"),
        "first assistant message dropped"
    );

    let mut prepare_args = args(&input, &dir.join("out"));
    prepare_args.max_len = 64;
    prepare_args.eval_fraction = 0.0;
    let summary = prepare(&prepare_args).unwrap();
    let count = |reason: SkipReason| summary.skipped.get(reason.name()).copied().unwrap_or(0);
    assert_eq!(summary.read, 11);
    assert_eq!(count(SkipReason::UnknownRole), 1);
    assert_eq!(
        count(SkipReason::EmptyConversation),
        2,
        "empty + only-gpt after the drop"
    );
    assert_eq!(count(SkipReason::DuplicateId), 1);
    assert_eq!(count(SkipReason::InvalidUtf8), 1);
    assert_eq!(count(SkipReason::Malformed), 1);
    assert_eq!(count(SkipReason::NoAssistantTokens), 1);
    assert_eq!(summary.dropped_first_assistant, 2);
    assert_eq!(summary.truncated, 1);
    assert_eq!(summary.kept, 4, "good, lead, long (truncated), roles");
    let samples = read_split(&dir.join("out"), Split::Train).unwrap();
    let ids: Vec<&str> = samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["good", "lead", "long", "roles"]);
    assert_eq!(samples[2].input_ids.len(), 64);
}

#[test]
fn invalid_utf8_inside_a_json_list_costs_one_record() {
    let dir = crate::common::scratch_dir("data", "utf8-list");
    let input = dir.join("in.json");
    let mut bytes = b"[\n".to_vec();
    bytes.extend(serde_json::to_vec(&sharegpt("a", &[("human", "x"), ("gpt", "y")])).unwrap());
    bytes.extend(
        b",\n{\"id\": \"b\", \"conversations\": [{\"from\": \"human\", \"value\": \"[\xc3\"}]},\n",
    );
    bytes.extend(serde_json::to_vec(&sharegpt("c", &[("human", "x]"), ("gpt", "{y")])).unwrap());
    bytes.extend(b"\n]\n");
    std::fs::write(&input, bytes).unwrap();
    let (conversations, skipped) = read_conversations(&input).unwrap();
    let ids: Vec<&str> = conversations.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["a", "c"]);
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].reason, SkipReason::InvalidUtf8);
    assert_eq!(skipped[0].position, "record 1 (line 3, column 1)");
}

#[test]
fn truncated_json_list_keeps_its_whole_records_and_reports_the_cut_tail() {
    let dir = crate::common::scratch_dir("data", "truncated");
    let input = dir.join("cut.json");
    let text = serde_json::to_string_pretty(&good_records(3)).unwrap();
    let cut = &text[..text.len() - 40];
    std::fs::write(&input, cut).unwrap();
    let (conversations, skipped) = read_conversations(&input).unwrap();
    let ids: Vec<&str> = conversations.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["c0", "c1"]);
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    let tail = &skipped[0];
    assert_eq!(tail.reason, SkipReason::CutOff);
    // The third record starts at the third `{` at the list's top level: on its own line, after
    // two spaces of indentation.
    let start = text.match_indices("\n  {").nth(2).unwrap().0 + 3;
    let line = text[..start].lines().count();
    assert_eq!(
        tail.position,
        format!("record 2 (line {line}, column 3), byte {start}")
    );
    let message = tail.to_string();
    assert!(
        message.contains(&format!("ends at byte {}", cut.len())),
        "{message}"
    );
    let mut prepare_args = args(&input, &dir.join("out"));
    prepare_args.eval_fraction = 0.0;
    let summary = prepare(&prepare_args).unwrap();
    assert_eq!((summary.read, summary.kept), (3, 2), "{summary:?}");
    assert_eq!(summary.skipped.get(SkipReason::CutOff.name()), Some(&1));

    let pretty_object = dir.join("object.json");
    std::fs::write(
        &pretty_object,
        "{\n  \"id\": \"x\",\n  \"conversations\": []\n}\n",
    )
    .unwrap();
    let err = format!("{:#}", read_conversations(&pretty_object).unwrap_err());
    assert!(
        err.contains("object.json: no record could be read") && err.contains("line 1"),
        "{err}"
    );
    let only_cut = dir.join("only-cut.json");
    std::fs::write(&only_cut, &text[..text.find("question 0").unwrap()]).unwrap();
    let err = format!("{:#}", read_conversations(&only_cut).unwrap_err());
    assert!(
        err.contains("only-cut.json: no record could be read") && err.contains("byte 4"),
        "{err}"
    );
    let missing = read_conversations(&dir.join("absent.json")).unwrap_err();
    assert!(format!("{missing:#}").contains("absent.json"));
}

#[test]
fn parquet_input_with_json_strings_and_structs() {
    use arrow::array::{Array, ArrayRef, ListArray, RecordBatch, StringArray, StructArray};
    use arrow::buffer::OffsetBuffer;
    use arrow::datatypes::{DataType, Field};
    use std::sync::Arc;

    let dir = crate::common::scratch_dir("data", "parquet");
    let write = |name: &str, conversations: ArrayRef| {
        let ids: ArrayRef = Arc::new(StringArray::from(vec!["p0", "p1"]));
        let batch = RecordBatch::try_from_iter(vec![("id", ids), ("conversations", conversations)])
            .unwrap();
        let path = dir.join(name);
        let file = std::fs::File::create(&path).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        path
    };
    let expected = vec![
        Conversation {
            id: "p0".into(),
            messages: vec![
                Message::new(Role::User, "q"),
                Message::new(Role::Assistant, "a"),
            ],
        },
        Conversation {
            id: "p1".into(),
            messages: vec![
                Message::new(Role::System, "s"),
                Message::new(Role::User, "u"),
            ],
        },
    ];

    let as_json: ArrayRef = Arc::new(StringArray::from(vec![
        r#"[{"from":"human","value":"q"},{"from":"gpt","value":"a"}]"#,
        r#"[{"role":"system","content":"s"},{"role":"user","content":"u"}]"#,
    ]));
    let (conversations, skipped) = read_conversations(&write("json.parquet", as_json)).unwrap();
    assert!(skipped.is_empty());
    assert_eq!(conversations, expected);

    let from: ArrayRef = Arc::new(StringArray::from(vec!["human", "gpt", "system", "human"]));
    let value: ArrayRef = Arc::new(StringArray::from(vec!["q", "a", "s", "u"]));
    let items = StructArray::from(vec![
        (Arc::new(Field::new("from", DataType::Utf8, true)), from),
        (Arc::new(Field::new("value", DataType::Utf8, true)), value),
    ]);
    let field = Arc::new(Field::new("item", items.data_type().clone(), true));
    let lists = ListArray::new(
        field,
        OffsetBuffer::from_lengths([2, 2]),
        Arc::new(items),
        None,
    );
    let (conversations, skipped) =
        read_conversations(&write("struct.parquet", Arc::new(lists))).unwrap();
    assert!(skipped.is_empty());
    assert_eq!(conversations, expected);
}

#[test]
fn chitchat_import_groups_runs_into_alternating_turns() {
    let dir = crate::common::scratch_dir("data", "chitchat");
    let input = dir.join("dataset.json");
    let m = |text: &str, sender: &str| serde_json::json!({"text": text, "timestamp": "t", "sender": sender});
    let dataset = serde_json::json!({
        "k2": {"messages": [[m("Hello", "A"), m("How are you?", "A")], [m("fine", "B")], [m("good", "A")]],
               "prompt": "p", "ratings": {}, "start": "s"},
        "k1": {"messages": [[m("alone", "C")]], "prompt": "p", "ratings": {}, "start": "s"},
    });
    std::fs::write(&input, dataset.to_string()).unwrap();
    let out = dir.join("sub/chitchat.json");
    assert_eq!(import_chitchat(&input, &out).unwrap(), 2);
    let (conversations, skipped) = read_conversations(&out).unwrap();
    assert!(skipped.is_empty());
    assert_eq!(
        conversations,
        vec![
            Conversation {
                id: "k1".into(),
                messages: vec![Message::new(Role::User, "alone")]
            },
            Conversation {
                id: "k2".into(),
                messages: vec![
                    Message::new(Role::User, "Hello\nHow are you?"),
                    Message::new(Role::Assistant, "fine"),
                    Message::new(Role::User, "good"),
                ],
            },
        ]
    );
}

#[test]
fn prepare_args_parse_with_documented_flags_and_defaults() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        prepare: clover::cli::data::PrepareArgs,
    }
    let cli =
        Cli::try_parse_from(["clover", "--input", "a.json", "--model", "m", "--out", "o"]).unwrap();
    let p = cli.prepare.options();
    assert_eq!(
        (p.template.as_str(), p.max_len, p.eval_fraction, p.seed),
        ("auto", 2048, 0.05, 0)
    );
    let cli = Cli::try_parse_from([
        "clover",
        "--input",
        "a.json",
        "--model",
        "m",
        "--out",
        "o",
        "--template",
        "vicuna",
        "--max-len",
        "512",
        "--eval-fraction",
        "0.1",
        "--seed",
        "3",
    ])
    .unwrap();
    let p = cli.prepare.options();
    assert_eq!(
        (p.template.as_str(), p.max_len, p.eval_fraction, p.seed),
        ("vicuna", 512, 0.1, 3)
    );
}
