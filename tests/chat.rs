//! Chat templates against goldens from HF `apply_chat_template` (scripts/golden_templates.py).

use crate::common::{fixture, fixture_model_dir, scratch_dir, Scratch};
use clover::formats::chat::{mask_from_spans, ChatTokenizer, Message, Role, LLAMA3_SYSTEM_PROMPT};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    template: String,
    messages: Vec<Message>,
    text: String,
    input_ids: Vec<i64>,
    loss_mask: Vec<u8>,
    prompt_text: String,
    prompt_ids: Vec<i64>,
}

fn goldens() -> Vec<Golden> {
    let path = fixture("chat").join("golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn check_template(name: &str) {
    // The goldens render the messages as given: no default system prompt.
    let chat = ChatTokenizer::from_model_dir(&fixture_model_dir(), Some(name))
        .unwrap()
        .with_system_prompt(false);
    let cases: Vec<Golden> = goldens()
        .into_iter()
        .filter(|g| g.template == name)
        .collect();
    assert_eq!(
        cases.len(),
        2,
        "{name}: goldens without and with a system message"
    );
    for golden in cases {
        let rendered = chat.render_conversation(&golden.messages).unwrap();
        assert_eq!(rendered.text, golden.text, "{name}: rendered text");
        let (ids, mask) = chat.encode_conversation(&golden.messages).unwrap();
        assert_eq!(ids, golden.input_ids, "{name}: ids");
        assert_eq!(mask, golden.loss_mask, "{name}: loss mask");
        assert!(mask.contains(&1) && mask.contains(&0));
        assert_eq!(
            chat.render_prompt(&golden.messages).unwrap(),
            golden.prompt_text
        );
        assert_eq!(
            chat.encode_prompt(&golden.messages).unwrap(),
            golden.prompt_ids
        );
    }
}

#[test]
fn vicuna_matches_fastchat_and_hf_mask() {
    check_template("vicuna");
}

#[test]
fn llama3_matches_official_template() {
    check_template("llama3");
}

/// The reference prompts LLaMA-3-Instruct with its safety system prompt, in data and in eval.
/// HF's template puts a system message's (trimmed) content between the system header and
/// `<|eot_id|>`, so its rendering with the safety prompt is the golden's system-message rendering
/// with that content swapped in.
#[test]
fn llama3_puts_the_reference_system_prompt_first_by_default() {
    let golden = goldens()
        .into_iter()
        .find(|g| g.template == "llama3" && g.messages[0].role == Role::System)
        .expect("a llama3 golden with a system message");
    let own_system = golden.messages[0].content.trim().to_string();
    let rest = &golden.messages[1..];
    let chat = ChatTokenizer::from_model_dir(&fixture_model_dir(), Some("llama3")).unwrap();
    assert_eq!(chat.system_prompt(), Some(LLAMA3_SYSTEM_PROMPT));
    let want_text = golden
        .text
        .replacen(&own_system, LLAMA3_SYSTEM_PROMPT.trim(), 1);
    let want_prompt = golden
        .prompt_text
        .replacen(&own_system, LLAMA3_SYSTEM_PROMPT.trim(), 1);
    assert_eq!(chat.render_conversation(rest).unwrap().text, want_text);
    assert_eq!(chat.render_prompt(rest).unwrap(), want_prompt);
    // The system prompt is not trained on: the mask covers the same assistant text.
    let (ids, mask) = chat.encode_conversation(rest).unwrap();
    let masked: Vec<u32> = ids
        .iter()
        .zip(&mask)
        .filter(|(_, m)| **m == 1)
        .map(|(i, _)| *i as u32)
        .collect();
    let golden_masked: Vec<u32> = golden
        .input_ids
        .iter()
        .zip(&golden.loss_mask)
        .filter(|(_, m)| **m == 1)
        .map(|(i, _)| *i as u32)
        .collect();
    assert_eq!(masked, golden_masked);
    // A conversation's own system message wins; the option turns the default off.
    assert_eq!(
        chat.render_conversation(&golden.messages).unwrap().text,
        golden.text
    );
    let plain = ChatTokenizer::from_model_dir(&fixture_model_dir(), Some("llama3"))
        .unwrap()
        .with_system_prompt(false);
    assert!(!plain.render_prompt(rest).unwrap().contains("respectful"));
    // Other families get no default system prompt.
    let chatml = ChatTokenizer::from_model_dir(&fixture_model_dir(), Some("chatml")).unwrap();
    assert_eq!(chatml.system_prompt(), None);
}

#[test]
fn chatml_matches_hf() {
    check_template("chatml");
}

#[test]
fn auto_uses_the_models_own_template() {
    check_template("auto");
    let default = ChatTokenizer::from_model_dir(&fixture_model_dir(), None).unwrap();
    let messages = vec![Message::new(Role::User, "hi")];
    let text = default.render_prompt(&messages).unwrap();
    assert!(
        text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{text}"
    );
}

#[test]
fn conversation_ending_with_user_has_no_mask() {
    let chat = ChatTokenizer::from_model_dir(&fixture_model_dir(), Some("chatml")).unwrap();
    let (ids, mask) = chat
        .encode_conversation(&[
            Message::new(Role::System, "s"),
            Message::new(Role::User, "question"),
        ])
        .unwrap();
    assert!(!ids.is_empty());
    assert!(mask.iter().all(|&m| m == 0));
}

#[test]
fn stop_ids_hold_eos_and_end_of_turn() {
    let chat = ChatTokenizer::from_model_dir(&fixture_model_dir(), None).unwrap();
    let im_end = chat.tokenizer.token_to_id("<|im_end|>").unwrap() as i64;
    assert!(chat.stop_ids().contains(&im_end));
    let text = chat.decode(&[im_end]).unwrap();
    assert_eq!(text, "", "special tokens are skipped when decoding");
}

#[test]
fn template_errors_are_reported_not_panics() {
    let chat = ChatTokenizer::from_model_dir(&fixture_model_dir(), Some("vicuna")).unwrap();
    let messages = vec![
        Message::new(Role::User, "q"),
        Message::new(Role::System, "late system"),
    ];
    let err = chat.encode_conversation(&messages).unwrap_err();
    assert!(
        format!("{err:#}").contains("system message is only allowed first"),
        "{err:#}"
    );
    let err = ChatTokenizer::from_model_dir(&fixture_model_dir(), Some("alpaca"))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("unknown template"), "{err:#}");
}

#[test]
fn mask_marks_first_to_last_overlapping_token() {
    let offsets = [(0, 3), (3, 4), (4, 4), (4, 8), (8, 9)];
    assert_eq!(mask_from_spans(&offsets, &[3..8]), vec![0, 1, 1, 1, 0]);
    assert_eq!(mask_from_spans(&offsets, &[2..5]), vec![1, 1, 1, 1, 0]);
    assert_eq!(mask_from_spans(&offsets, &[]), vec![0; 5]);
}

/// A model dir with the fixture tokenizer and the given tokenizer_config.json.
fn model_dir_with_config(name: &str, config: serde_json::Value) -> Scratch {
    let dir = scratch_dir("chat", name);
    std::fs::copy(
        fixture_model_dir().join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn model_templates_get_python_string_methods_and_named_templates() {
    let template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}\
        {{ '<|im_start|>' + m['role'] + '\n' + m['content'].strip() + '<|im_end|>\n' }}{% endfor %}\
        {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let config = serde_json::json!({
        "bos_token": {"content": "<|im_start|>"},
        "eos_token": "<|im_end|>",
        "chat_template": [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": template}],
    });
    let dir = model_dir_with_config("named", config);
    let chat = ChatTokenizer::from_model_dir(&dir, None).unwrap();
    let messages = vec![
        Message::new(Role::User, "  hi \n"),
        Message::new(Role::Assistant, "\tyes "),
    ];
    let rendered = chat.render_conversation(&messages).unwrap();
    assert_eq!(
        rendered.text,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
    );
    assert_eq!(&rendered.text[rendered.spans[0].clone()], "yes<|im_end|>");
    let err = chat
        .encode_prompt(&[Message::new(Role::System, "s")])
        .unwrap_err();
    assert!(format!("{err:#}").contains("no system"), "{err:#}");
}

#[test]
fn auto_without_a_model_template_is_an_error() {
    let dir = model_dir_with_config(
        "no-template",
        serde_json::json!({"eos_token": "<|im_end|>"}),
    );
    let err = ChatTokenizer::from_model_dir(&dir, Some("auto"))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("no chat_template"), "{err:#}");
    assert!(ChatTokenizer::from_model_dir(&dir, Some("llama3")).is_ok());
}
