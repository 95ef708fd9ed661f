use crate::common::{fixture, fixture_teacher, smollm2_dir};
use clover::decode::generate::{generate, generate_batch, GenerationConfig};
use clover::model::teacher::Teacher;
use tch::{Device, Kind};

fn greedy(max_new_tokens: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        temperature: 0.0,
        seed: 0,
        stop_ids: vec![],
    }
}

#[test]
fn left_padded_batch_equals_one_prompt_at_a_time() {
    let teacher = fixture_teacher("tiny-llama-untied", Kind::Float);
    let prompts = vec![
        vec![1i64, 5, 17, 33, 2, 64, 70],
        vec![1, 9],
        vec![1, 44, 45, 46],
    ];
    let batched = generate_batch(&teacher, &prompts, &greedy(12)).unwrap();
    for (prompt, answer) in prompts.iter().zip(&batched) {
        let single = generate(&teacher, prompt, &greedy(12)).unwrap().answer;
        assert_eq!(&single, answer, "prompt {prompt:?}");
        assert_eq!(answer.token_ids.len(), 12);
    }
}

#[test]
fn stop_tokens_end_a_row_without_being_returned() {
    let teacher = fixture_teacher("tiny-llama-tied", Kind::Float);
    let free = generate(&teacher, &[1, 5, 17], &greedy(10)).unwrap().answer;
    let stop = free.token_ids[3];
    let cfg = GenerationConfig {
        stop_ids: vec![stop],
        ..greedy(10)
    };
    let stopped = generate(&teacher, &[1, 5, 17], &cfg).unwrap().answer;
    let first = free.token_ids.iter().position(|&t| t == stop).unwrap();
    assert!(stopped.stopped);
    assert_eq!(stopped.token_ids, free.token_ids[..first]);
}

#[derive(serde::Deserialize)]
struct GreedyCase {
    prompt: String,
    prompt_ids: Vec<i64>,
    new_ids: Vec<i64>,
}

/// Golden ids from HF transformers' LlamaForCausalLM on the same imported dir
/// (scripts/golden_smollm2.py), f32 on the CPU.
#[test]
fn smollm2_greedy_ids_equal_transformers() {
    let dir = smollm2_dir();
    let cases: Vec<GreedyCase> =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_greedy.json")).unwrap())
            .unwrap();
    let chat = clover::formats::chat::ChatTokenizer::from_model_dir(&dir, None).unwrap();
    let teacher = Teacher::load(&dir, Device::Cpu, Kind::Float).unwrap();
    for case in cases {
        let messages = [clover::formats::chat::Message::new(
            clover::formats::chat::Role::User,
            case.prompt.clone(),
        )];
        assert_eq!(
            chat.encode_prompt(&messages).unwrap(),
            case.prompt_ids,
            "{}",
            case.prompt
        );
        let ours = generate(&teacher, &case.prompt_ids, &greedy(case.new_ids.len())).unwrap();
        assert_eq!(ours.answer.token_ids, case.new_ids, "{}", case.prompt);
    }
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    let dir = smollm2_dir();
    let chat = clover::formats::chat::ChatTokenizer::from_model_dir(&dir, None).unwrap();
    let teacher = Teacher::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let messages = [clover::formats::chat::Message::new(
        clover::formats::chat::Role::User,
        "What is the capital of France?",
    )];
    let prompt = chat.encode_prompt(&messages).unwrap();
    let cfg = GenerationConfig {
        stop_ids: chat.stop_ids(),
        ..greedy(32)
    };
    let answer = generate(&teacher, &prompt, &cfg).unwrap().answer;
    let text = chat.decode(&answer.token_ids).unwrap();
    assert!(text.contains("Paris"), "answer: {text}");
}

/// `generate --tree` reads the names `eval --tree` reads: `default` is the built-in tree, not a
/// file called "default" (the two commands once parsed tree names apart), and the trees that
/// need a per-head choice are refused by name.
#[test]
fn generate_reads_tree_default_as_eval_does() {
    tch::set_num_threads(1);
    let model = crate::common::smollm2_dir();
    let dir = crate::common::scratch_dir("generate", "tree-default");
    let draft = dir.join("draft");
    crate::common::export_random_head(&model, &draft);
    let generate = |tree: &str| {
        crate::common::run_clover(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--draft",
            draft.to_str().unwrap(),
            "--tree",
            tree,
            "--prompt",
            "The sea is",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
            "--json",
        ])
    };
    let (code, text) = generate("default");
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("\"tau\""), "{text}");
    let (code, text) = generate("auto");
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("generate decodes with a static tree"),
        "{text}"
    );
}
