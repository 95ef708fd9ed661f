//! `clover init-random`: real architectures with random weights load and run like real models.

use crate::common::{run_clover, scratch_dir};
use clover::formats::chat::{ChatTokenizer, Message, Role};
use clover::model::random::{write_random_model, Like};
use clover::model::teacher::Teacher;
use tch::{Device, Kind, Tensor};

#[test]
fn a_random_smollm2_shape_loads_tokenizes_and_generates() {
    let root = scratch_dir("random", "smollm2");
    let dir = root.join("model");
    let dir_arg = dir.to_str().unwrap();
    let (code, text) = run_clover(&[
        "init-random",
        "--like",
        "smollm2-135m",
        "--layers",
        "2",
        "--out",
        dir_arg,
    ]);
    assert_eq!(code, 0, "{text}");
    let teacher = Teacher::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let arch = Like::Smollm2_135m.architecture();
    let c = &teacher.config;
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (arch.hidden_size, arch.intermediate_size, 2)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.vocab_size),
        (9, 3, 49152)
    );
    assert_eq!(c.rope_theta, arch.rope_theta);
    // HF's init: weights ~ N(0, 0.02), so their standard deviation is 0.02 within sampling error
    // (n = 49152·576 draws: the relative error of a sample std is about 1/sqrt(2n) < 1e-3).
    let std = teacher
        .lm_head_weight()
        .to_kind(Kind::Float)
        .std(true)
        .double_value(&[]);
    assert!((std - 0.02).abs() < 0.02 * 0.01, "weight std {std}");
    let chat = ChatTokenizer::from_model_dir(&dir, None).unwrap();
    let ids = chat
        .encode_prompt(&[Message::new(Role::User, "w5 w6 w7")])
        .unwrap();
    assert!(ids.contains(&5) && ids.contains(&7), "{ids:?}");
    let u = teacher.forward(
        &Tensor::from_slice(&ids).unsqueeze(0),
        &Tensor::arange(ids.len() as i64, (Kind::Int64, Device::Cpu)).unsqueeze(0),
        None,
        None,
    );
    assert_eq!(u.size(), vec![1, ids.len() as i64, 576]);
    // The whole command line runs on it.
    let (code, text) = run_clover(&[
        "generate",
        "--device",
        "cpu",
        "--max-new-tokens",
        "3",
        "--prompt",
        "w9 w10",
        "--model",
        dir_arg,
    ]);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn init_random_refuses_a_directory_that_holds_files_and_zero_layers() {
    let root = scratch_dir("random", "refuse");
    std::fs::write(root.join("keep.txt"), "mine").unwrap();
    let err = write_random_model(Like::Vicuna7b, Some(1), &root, 0).unwrap_err();
    assert!(format!("{err}").contains("already holds files"), "{err}");
    assert_eq!(
        std::fs::read_to_string(root.join("keep.txt")).unwrap(),
        "mine"
    );
    let err = write_random_model(Like::Vicuna7b, Some(0), &root.join("new"), 0).unwrap_err();
    assert!(format!("{err}").contains("--layers"), "{err}");
}

/// The 7B/8B shapes, checked without writing gigabytes: the weight list matches the published
/// parameter counts (Vicuna-7B 6.74B, LLaMA-3-8B 8.03B).
#[test]
fn seven_and_eight_billion_shapes_have_their_published_parameter_counts() {
    let count = |like: Like| -> i64 {
        like.architecture()
            .weight_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<i64>())
            .sum()
    };
    assert_eq!(count(Like::Vicuna7b), 6_738_415_616);
    assert_eq!(count(Like::Llama3_8bInstruct), 8_030_261_248);
    assert_eq!(count(Like::Smollm2_135m), 134_515_008);
}

/// The in-memory random teacher (for `--like` benchmarks) is the one `init-random` writes.
#[test]
fn the_in_memory_random_teacher_equals_the_written_one() {
    let root = scratch_dir("random", "in-memory");
    let dir = root.join("model");
    write_random_model(Like::Smollm2_135m, Some(1), &dir, 7).unwrap();
    let loaded = Teacher::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let built = clover::model::random::random_teacher(
        Like::Smollm2_135m,
        Some(1),
        Device::Cpu,
        Kind::Float,
        7,
    )
    .unwrap();
    let ids = Tensor::from_slice(&[5i64, 9, 300, 7]).unsqueeze(0);
    let pos = Tensor::arange(4, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let a = loaded.logits(&loaded.forward(&ids, &pos, None, None));
    let b = built.logits(&built.forward(&ids, &pos, None, None));
    // The same bf16 weights and the same f32 arithmetic: identical.
    assert!(a.equal(&b));
}

/// `bench-train` on a random teacher: one JSON line per mode with the keys the GPU check reads.
#[test]
fn bench_train_reports_offline_and_online_steps_as_json_lines() {
    let (code, text) = run_clover(&[
        "bench-train",
        "--like",
        "smollm2-135m",
        "--layers",
        "1",
        "--batch",
        "1",
        "--seq-len",
        "16",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--mode",
        "both",
        "--num-depths",
        "2",
    ]);
    assert_eq!(code, 0, "{text}");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for (line, mode) in lines.iter().zip(["offline", "online"]) {
        assert_eq!(line["mode"], mode);
        for key in [
            "tokens_per_s",
            "ms_per_step",
            "peak_bytes",
            "device",
            "dtype",
            "batch",
            "seq_len",
            "loss_chunk",
        ] {
            assert!(!line[key].is_null(), "{key} missing in {line}");
        }
        // The spelling eval reports and `--device` use, not tch's `Cpu`.
        assert_eq!(line["device"], "cpu");
        assert!(line["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(line["last_loss"].as_f64().unwrap().is_finite());
    }
}
