//! Hostile records for `data prepare` (issue 19): a conversation of 100k turns or one enormous
//! string must cost what its kept `--max-len` tokens need, not what the record holds, and give
//! exactly the tokens the whole record would; a tokenizer whose ids the model lacks and a
//! `--max-len` past the model's context are refused before any work.

use crate::common::{fixture_model_dir, run_clover, scratch_dir};
use clover::data::prepare::{prepare, PrepareOptions};
use clover::data::shards::{read_split, Split};
use clover::formats::chat::{mask_from_spans, ChatTokenizer, Effort, Message, Role, TemplateName};
use clover::formats::token_head::{encode_head, WholeText};
use clover::training::batches::SplitMix64;
use std::path::Path;

fn chatml() -> ChatTokenizer {
    ChatTokenizer::from_model_dir(&fixture_model_dir(), Some("chatml")).unwrap()
}

/// `turns` messages alternating user and assistant, each a few words.
fn many_turns(turns: usize) -> Vec<Message> {
    (0..turns)
        .map(|i| {
            let role = [Role::User, Role::Assistant][i % 2];
            Message::new(role, format!("turn {i} says hello"))
        })
        .collect()
}

/// A short question and an answer of about `bytes` bytes (words, then a long run without spaces
/// so that a prefix cut can land inside one pre-token).
fn huge_string(bytes: usize) -> Vec<Message> {
    let unit = "lorem ipsum dolor, sit amet 12345 ";
    let mut text = unit.repeat(bytes / 2 / unit.len());
    text.push_str(&"a".repeat(bytes / 2));
    vec![
        Message::new(Role::User, "tell me everything"),
        Message::new(Role::Assistant, text),
    ]
}

/// What `data prepare` did before issue 19: render and tokenize the whole conversation, then
/// keep its first `max_len` tokens. Returns (ids, mask, truncated).
fn whole_then_cut(
    chat: &ChatTokenizer,
    messages: &[Message],
    max_len: usize,
) -> (Vec<i64>, Vec<u8>, bool) {
    let rendered = chat.render_conversation(messages).unwrap();
    let encoding = chat
        .tokenizer
        .encode(rendered.text.as_str(), false)
        .unwrap();
    let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&id| id as i64).collect();
    let mut mask = mask_from_spans(encoding.get_offsets(), &rendered.spans);
    let truncated = ids.len() > max_len;
    ids.truncate(max_len);
    mask.truncate(max_len);
    (ids, mask, truncated)
}

fn head_of(
    chat: &ChatTokenizer,
    messages: &[Message],
    max_len: usize,
) -> (Vec<i64>, Vec<u8>, bool) {
    let head = chat.encode_conversation_head(messages, max_len).unwrap();
    (head.ids, head.mask, head.truncated)
}

fn effort_of(chat: &ChatTokenizer, messages: &[Message], max_len: usize) -> Effort {
    chat.encode_conversation_head(messages, max_len)
        .unwrap()
        .effort
}

#[test]
fn the_work_on_a_long_conversation_does_not_grow_with_its_turns() {
    let chat = chatml();
    let max_len = 64;
    let short = effort_of(&chat, &many_turns(1_000), max_len);
    let long = effort_of(&chat, &many_turns(100_000), max_len);
    assert_eq!(
        short, long,
        "the 99k turns past the kept tokens cost nothing"
    );
    // 64 tokens are a handful of turns: every render and tokenization stays within what the
    // first few dozen turns hold (the whole 1k-turn record renders to ~30 kB).
    assert!(long.rendered_messages < 1_000, "{long:?}");
    assert!(long.tokenized_bytes < 16 * 1024, "{long:?}");
    assert_eq!(
        head_of(&chat, &many_turns(100_000), max_len),
        whole_then_cut(&chat, &many_turns(1_000), max_len),
        "the same first tokens as the whole record gives"
    );
}

#[test]
fn the_work_on_an_enormous_string_does_not_grow_with_its_length() {
    let chat = chatml();
    let max_len = 512;
    let small = effort_of(&chat, &huge_string(1 << 20), max_len);
    let huge = effort_of(&chat, &huge_string(50 << 20), max_len);
    assert_eq!(
        small.tokenized_bytes, huge.tokenized_bytes,
        "{small:?} {huge:?}"
    );
    assert!(huge.tokenized_bytes < 256 * 1024, "{huge:?}");
    let record = huge_string(200_000);
    assert_eq!(
        head_of(&chat, &record, max_len),
        whole_then_cut(&chat, &record, max_len)
    );
}

/// Prompts for regeneration: a prompt past the cap is recognised without tokenizing all of it,
/// and one within the cap is tokenized exactly as before.
#[test]
fn an_enormous_prompt_is_measured_by_its_first_tokens() {
    let chat = chatml();
    let huge = [Message::new(Role::User, "many words ".repeat(5 << 20))];
    let head = chat.encode_prompt_head(&huge, 1025).unwrap();
    assert_eq!(head.ids.len(), 1025);
    assert!(
        head.truncated && head.tokenized_bytes < 256 * 1024,
        "{}",
        head.tokenized_bytes
    );
    let fits = [Message::new(Role::User, "a few words ".repeat(50))];
    let head = chat.encode_prompt_head(&fits, 1025).unwrap();
    assert_eq!(head.ids, chat.encode_prompt(&fits).unwrap());
    assert!(!head.truncated);
}

/// Random conversations (words, long runs, spaces, multi-byte text) under every template and
/// many `--max-len`s: the head is always the whole record's first tokens, mask and flag too.
#[test]
fn a_head_is_always_the_whole_records_first_tokens() {
    let pieces = [
        "hello",
        " ",
        "  ",
        "\n",
        "wörld",
        "日本語",
        "🙂",
        "1234567",
        "aaaaaaaaaaaaaaaaaaaa",
        "<|im_end|>",
        ",",
        "ASSISTANT:",
        "\t\t",
    ];
    let mut rng = SplitMix64::new(19);
    let mut draw = |n: usize| (rng.next_u64() % n as u64) as usize;
    for template in ["chatml", "vicuna", "llama3", "auto"] {
        let chat = ChatTokenizer::from_model_dir(&fixture_model_dir(), Some(template)).unwrap();
        for case in 0..60 {
            let turns = 1 + draw(12);
            let mut messages = Vec::new();
            for i in 0..turns {
                let long = draw(4) == 0;
                let words = draw(if long { 400 } else { 20 });
                let text: String = (0..words).map(|_| pieces[draw(pieces.len())]).collect();
                messages.push(Message::new([Role::User, Role::Assistant][i % 2], text));
            }
            let max_len = 2 + draw(300);
            assert_eq!(
                head_of(&chat, &messages, max_len),
                whole_then_cut(&chat, &messages, max_len),
                "{template} case {case}, max_len {max_len}"
            );
        }
    }
}

/// A prefix whose cut splits a token just at the kept boundary tokenizes differently from the
/// whole there; the head must come from a prefix long enough to agree with a longer one. The
/// tokenizer is told its tokens hold at most 1 byte (the fixture's `<jupyter_output>` holds 16),
/// as a normalizer that shrinks text would mislead it, so that the prefixes it tries are short:
/// 34 digits (one token each) and then 16-byte tokens put token 63 at bytes 498..514, across the
/// 512-byte prefix, where it falls apart into pieces.
#[test]
fn a_token_cut_by_the_prefix_does_not_reach_the_head() {
    let chat = chatml();
    let text = "7".repeat(34) + &"<jupyter_output>".repeat(200);
    let limit = 64;
    let whole = chat.tokenizer.encode(text.as_str(), false).unwrap();
    let head = encode_head(&chat.tokenizer, &mut WholeText(&text), limit, 1).unwrap();
    let want: Vec<i64> = whole.get_ids()[..limit]
        .iter()
        .map(|&id| id as i64)
        .collect();
    assert_eq!(head.ids, want);
    assert_eq!(head.offsets, whole.get_offsets()[..limit]);
    assert!(head.truncated);
}

fn options(input: &Path, model: &Path, out: &Path, max_len: usize) -> PrepareOptions {
    PrepareOptions {
        input: input.to_path_buf(),
        model: model.to_path_buf(),
        template: TemplateName::Chatml,
        out: out.to_path_buf(),
        max_len,
        eval_fraction: 0.0,
        seed: 0,
        no_system_prompt: false,
        held_out: None,
    }
}

fn write_jsonl(path: &Path, records: &[(&str, &[Message])]) {
    let lines: Vec<String> = records
        .iter()
        .map(|(id, messages)| {
            let turns: Vec<_> = messages
                .iter()
                .map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content}))
                .collect();
            serde_json::json!({"id": id, "messages": turns}).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

#[test]
fn prepare_keeps_the_first_tokens_of_enormous_records() {
    let dir = scratch_dir("hostile-prepare", "enormous");
    let input = dir.join("in.jsonl");
    let ordinary = many_turns(4);
    let (turns, string) = (many_turns(100_000), huge_string(50 << 20));
    write_jsonl(
        &input,
        &[
            ("turns", &turns),
            ("string", &string),
            ("ordinary", &ordinary),
        ],
    );
    let max_len = 512;
    let summary = prepare(&options(
        &input,
        &fixture_model_dir(),
        &dir.join("out"),
        max_len,
    ))
    .unwrap();
    assert_eq!((summary.kept, summary.truncated), (3, 2), "{summary:?}");
    let samples = read_split(&dir.join("out"), Split::Train).unwrap();
    let chat = chatml();
    let want = [
        whole_then_cut(&chat, &turns[..500], max_len),
        whole_then_cut(&chat, &huge_string(200_000), max_len),
        whole_then_cut(&chat, &ordinary, max_len),
    ];
    for (sample, (ids, mask, _)) in samples.iter().zip(want) {
        assert_eq!(
            (&sample.input_ids, &sample.loss_mask),
            (&ids, &mask),
            "{}",
            sample.id
        );
    }
}

/// A model dir: the fixture's tokenizer files and a config.json with these fields.
fn model_dir(dir: &Path, config: serde_json::Value) -> std::path::PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture_model_dir().join(file), model.join(file)).unwrap();
    }
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    model
}

fn prepare_cli(input: &Path, model: &Path, out: &Path, max_len: usize) -> (i32, String) {
    let max_len = max_len.to_string();
    run_clover(&[
        "data".as_ref(),
        "prepare".as_ref(),
        "--input".as_ref(),
        input.as_os_str(),
        "--model".as_ref(),
        model.as_os_str(),
        "--template".as_ref(),
        "chatml".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
        "--max-len".as_ref(),
        std::ffi::OsStr::new(&max_len),
        "--eval-fraction".as_ref(),
        "0".as_ref(),
    ])
}

#[test]
fn a_tokenizer_with_ids_the_model_lacks_is_refused() {
    let dir = scratch_dir("hostile-prepare", "vocab");
    let input = dir.join("in.jsonl");
    write_jsonl(&input, &[("a", &many_turns(4))]);
    // The fixture's SmolLM2 tokenizer reaches id 40800; a 96-token model cannot embed it.
    let model = model_dir(&dir, serde_json::json!({"vocab_size": 96}));
    let (code, text) = prepare_cli(&input, &model, &dir.join("out"), 512);
    assert_eq!(code, 1, "{text}");
    for needle in ["tokenizer.json", "config.json", "40800", "vocab_size 96"] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
    assert!(!text.contains("panicked"), "{text}");
    assert!(!dir.join("out").exists(), "refused before any work");
    // A padded embedding table (config larger than the tokenizer) is fine.
    let model = model_dir(&dir, serde_json::json!({"vocab_size": 49152}));
    let (code, text) = prepare_cli(&input, &model, &dir.join("out"), 512);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn a_max_len_past_the_models_context_is_refused() {
    let dir = scratch_dir("hostile-prepare", "context");
    let input = dir.join("in.jsonl");
    write_jsonl(&input, &[("a", &many_turns(4))]);
    let model = model_dir(
        &dir,
        serde_json::json!({"vocab_size": 49152, "max_position_embeddings": 256}),
    );
    let (code, text) = prepare_cli(&input, &model, &dir.join("out"), 2048);
    assert_eq!(code, 1, "{text}");
    for needle in [
        "--max-len 2048",
        "config.json",
        "max_position_embeddings 256",
        "--max-len 256 or less",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
    let (code, text) = prepare_cli(&input, &model, &dir.join("out"), 256);
    assert_eq!(code, 0, "{text}");
}
