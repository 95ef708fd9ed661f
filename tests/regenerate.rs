use crate::common::smollm2_dir;
use clover::data::regenerate::{run, RegenerateOptions, OUTPUT_FILE};
use std::path::Path;

fn conversations(path: &Path) {
    let text = r#"[
 {"id": "a", "conversations": [{"from": "human", "value": "Hi! How are you?"}, {"from": "gpt", "value": "old answer"}, {"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "old"}]},
 {"id": "b", "conversations": [{"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "old"}]},
 {"id": "c", "conversations": [{"role": "user", "content": "Say hello in French."}, {"role": "assistant", "content": "old"}]}
]"#;
    std::fs::write(path, text).unwrap();
}

fn args(data: &Path, out: &Path, max_batches: Option<usize>) -> RegenerateOptions {
    RegenerateOptions {
        data: data.to_path_buf(),
        model: smollm2_dir(),
        out: out.to_path_buf(),
        max_new_tokens: 6,
        temperature: 0.0,
        batch_size: 2,
        max_turns: Some(2),
        limit: None,
        template: clover::formats::chat::TemplateName::Auto,
        no_system_prompt: false,
        seed: 0,
        run_on: clover::model::device::RunOn::cpu(),
        max_batches,
        max_prompt_tokens: 1536,
        shard: "0/1".into(),
    }
}

#[test]
fn regenerated_answers_replace_the_assistant_turns_and_resume_exactly() {
    let root = crate::common::scratch_dir("regen", "resume");
    let input = root.join("in.json");
    conversations(&input);
    let (whole, resumed) = (root.join("whole"), root.join("resumed"));
    run(&args(&input, &whole, None)).unwrap();
    run(&args(&input, &resumed, Some(1))).unwrap();
    assert!(
        !resumed.join(OUTPUT_FILE).exists(),
        "an interrupted run must not write the final file"
    );
    run(&args(&input, &resumed, None)).unwrap();
    let a = std::fs::read_to_string(whole.join(OUTPUT_FILE)).unwrap();
    let b = std::fs::read_to_string(resumed.join(OUTPUT_FILE)).unwrap();
    assert_eq!(a, b, "resumed output differs from the uninterrupted one");
    let changed = RegenerateOptions {
        max_new_tokens: 7,
        ..args(&input, &resumed, None)
    };
    let err = run(&changed).unwrap_err();
    assert!(format!("{err:#}").contains("other inputs"), "{err:#}");

    // Two workers (--shard 0/2 and 1/2) into one dir: the same file as one worker's.
    let sharded = root.join("sharded");
    for shard in ["1/2", "0/2"] {
        run(&RegenerateOptions {
            shard: shard.into(),
            ..args(&input, &sharded, None)
        })
        .unwrap();
    }
    let c = std::fs::read_to_string(sharded.join(OUTPUT_FILE)).unwrap();
    assert_eq!(a, c, "two workers' output differs from one worker's");

    let rows: Vec<serde_json::Value> = a
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["id"], "a");
    let turns = rows[0]["conversations"].as_array().unwrap();
    let froms: Vec<&str> = turns.iter().map(|t| t["from"].as_str().unwrap()).collect();
    assert_eq!(froms, ["human", "gpt", "human", "gpt"]);
    assert_eq!(turns[2]["value"], "What is 2+2?");
    for t in turns.iter().filter(|t| t["from"] == "gpt") {
        let v = t["value"].as_str().unwrap();
        assert!(
            !v.is_empty() && !v.starts_with("old"),
            "assistant turn not regenerated: {v:?}"
        );
    }
}
