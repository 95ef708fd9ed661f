use crate::common::{
    f32_paths_bound, fixture, fixture_teacher, max_abs, max_abs_diff, read_golden,
};
use clover::model::config::LlamaConfig;
use clover::model::teacher::Teacher;
use tch::{Device, Kind, Tensor};

/// Widest reduction per block of the tiny fixtures, for `f32_paths_bound`: two decoder layers
/// (MLP down projection over 160), then the final norm and lm_head (over H = 64) for logits.
const PRENORM_PATH: [i64; 2] = [160, 160];
const LOGITS_PATH: [i64; 3] = [160, 160, 64];

fn positions(start: i64, n: i64) -> Tensor {
    Tensor::arange_start(start, start + n, (Kind::Int64, Device::Cpu)).unsqueeze(0)
}

#[test]
fn tiny_llama_matches_transformers_tied_and_untied() {
    for name in ["tiny-llama-tied", "tiny-llama-untied"] {
        let teacher = fixture_teacher(name, Kind::Float);
        let golden = read_golden(&fixture(name).join("golden.safetensors"));
        let ids = &golden["input_ids"];
        let n = ids.size()[1];
        let u = tch::no_grad(|| teacher.forward(ids, &positions(0, n), None, None));
        let logits = tch::no_grad(|| teacher.logits(&u));
        let d_prenorm = max_abs_diff(&u, &golden["prenorm"]);
        let d_logits = max_abs_diff(&logits, &golden["logits"]);
        // Other library, other kernels: 2·320·2^-24·|u| ≈ 8e-4 at |u| ≈ 20; 2·384·2^-24·|l| ≈ 3e-4.
        let tol_prenorm = f32_paths_bound(&PRENORM_PATH, max_abs(&golden["prenorm"]));
        let tol_logits = f32_paths_bound(&LOGITS_PATH, max_abs(&golden["logits"]));
        assert!(
            d_prenorm <= tol_prenorm,
            "{name}: pre-norm hidden differs by {d_prenorm} (tol {tol_prenorm:e})"
        );
        assert!(
            d_logits <= tol_logits,
            "{name}: logits differ by {d_logits} (tol {tol_logits:e})"
        );
    }
}

#[test]
fn untied_fixture_has_gqa_and_llama3_rope_scaling() {
    let cfg = LlamaConfig::from_file(&fixture("tiny-llama-untied").join("config.json")).unwrap();
    assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads), (4, 2));
    assert!(!cfg.tie_word_embeddings);
    assert_eq!(cfg.rope_theta, 500000.0);
    assert_eq!(cfg.rope_scaling.unwrap().rope_type, "llama3");
}

#[test]
fn kv_cache_decoding_equals_full_recomputation() {
    let teacher = fixture_teacher("tiny-llama-untied", Kind::Float);
    let golden = read_golden(&fixture("tiny-llama-untied").join("golden.safetensors"));
    let ids = &golden["input_ids"];
    let n = ids.size()[1];
    let full = tch::no_grad(|| teacher.forward(ids, &positions(0, n), None, None));
    let mut cache = teacher.new_cache(1);
    // A 5-token prefill, a 3-token block after it (offset causal mask), then single tokens.
    let mut chunks = vec![(0, 5), (5, 3)];
    chunks.extend((8..n).map(|i| (i, 1)));
    let mut parts = vec![];
    for (start, len) in chunks {
        let chunk = ids.narrow(1, start, len);
        parts.push(tch::no_grad(|| {
            teacher.forward(&chunk, &positions(start, len), None, Some(&mut cache))
        }));
    }
    assert_eq!(cache.len(), n);
    let incremental = Tensor::cat(&parts, 1);
    let d = max_abs_diff(&incremental, &full);
    // Chunks of 5, 3, 1 rows vs one pass: 2·320·2^-24·|u| ≈ 8e-4 at |u| ≈ 20.
    let tol = f32_paths_bound(&PRENORM_PATH, max_abs(&full));
    assert!(
        d <= tol,
        "cached decoding differs from full recomputation by {d} (tol {tol:e})"
    );
}

#[test]
fn tree_mask_forward_equals_plain_forward_over_each_path() {
    let teacher = fixture_teacher("tiny-llama-tied", Kind::Float);
    let prefix = Tensor::from_slice(&[1i64, 5, 17, 33, 2]).unsqueeze(0);
    // Tree over 5 nodes: root r(0); children a(1), b(2) of r; c(3) child of a; d(4) child of c.
    let tokens = [40i64, 41, 42, 43, 44];
    let parents = [-1i64, 0, 0, 1, 3];
    let depth = |mut i: usize| {
        let mut d = 0;
        while parents[i] >= 0 {
            i = parents[i] as usize;
            d += 1;
        }
        d
    };
    let ancestors = |i: usize| {
        let mut path = vec![i];
        let mut j = i;
        while parents[j] >= 0 {
            j = parents[j] as usize;
            path.push(j);
        }
        path.reverse();
        path
    };
    let p = prefix.size()[1];
    let k = tokens.len() as i64;
    let mut mask = vec![false; (k * (p + k)) as usize];
    for i in 0..k as usize {
        for c in 0..p as usize {
            mask[i * (p + k) as usize + c] = true;
        }
        for a in ancestors(i) {
            mask[i * (p + k) as usize + p as usize + a] = true;
        }
    }
    let mask = Tensor::from_slice(&mask).view([1, 1, k, p + k]);
    let tree_pos: Vec<i64> = (0..k as usize).map(|i| p + depth(i) as i64).collect();

    let mut cache = teacher.new_cache(1);
    let tree_logits = tch::no_grad(|| {
        let _ = teacher.forward(&prefix, &positions(0, p), None, Some(&mut cache));
        let ids = Tensor::from_slice(&tokens).unsqueeze(0);
        let pos = Tensor::from_slice(&tree_pos).unsqueeze(0);
        teacher.logits(&teacher.forward(&ids, &pos, Some(&mask), Some(&mut cache)))
    });
    for i in 0..k as usize {
        let path: Vec<i64> = ancestors(i).iter().map(|&a| tokens[a]).collect();
        let seq = Tensor::cat(
            &[
                prefix.shallow_clone(),
                Tensor::from_slice(&path).unsqueeze(0),
            ],
            1,
        );
        let n = seq.size()[1];
        let plain =
            tch::no_grad(|| teacher.logits(&teacher.forward(&seq, &positions(0, n), None, None)));
        let d = max_abs_diff(&plain.select(1, n - 1), &tree_logits.select(1, i as i64));
        // Tree-masked block vs plain path: 2·384·2^-24·|l| ≈ 3e-4 at |l| ≈ 6.
        let tol = f32_paths_bound(&LOGITS_PATH, max_abs(&plain));
        assert!(
            d <= tol,
            "tree node {i}: logits differ from the plain path forward by {d} (tol {tol:e})"
        );
    }
}

#[test]
fn kv_cache_compaction_keeps_the_accepted_rows() {
    let teacher = fixture_teacher("tiny-llama-tied", Kind::Float);
    let seq = Tensor::from_slice(&[1i64, 5, 17, 33, 2, 64, 70]).unsqueeze(0);
    let mut cache = teacher.new_cache(1);
    tch::no_grad(|| {
        // Prefix of 3, then 4 speculative rows; the rows at absolute positions 3 and 5 (tokens 33
        // and 2, the second a child of the first) form the accepted path.
        let _ = teacher.forward(
            &seq.narrow(1, 0, 3),
            &positions(0, 3),
            None,
            Some(&mut cache),
        );
        let branch = Tensor::from_slice(&[33i64, 90, 2, 7]).unsqueeze(0);
        let pos = Tensor::from_slice(&[3i64, 4, 4, 5]).unsqueeze(0);
        let m = Tensor::from_slice(&[
            true, true, true, true, false, false, false, //
            true, true, true, true, true, false, false, //
            true, true, true, true, false, true, false, //
            true, true, true, true, false, true, true,
        ])
        .view([1, 1, 4, 7]);
        let _ = teacher.forward(&branch, &pos, Some(&m), Some(&mut cache));
        cache.compact(3, &Tensor::from_slice(&[3i64, 5]));
        assert_eq!(cache.len(), 5);
        let next = teacher.forward(
            &seq.narrow(1, 5, 1),
            &positions(5, 1),
            None,
            Some(&mut cache),
        );
        let full = teacher.forward(&seq.narrow(1, 0, 6), &positions(0, 6), None, None);
        let d = max_abs_diff(&next.select(1, 0), &full.select(1, 5));
        // Compacted cache vs one pass: 2·320·2^-24·|u| ≈ 8e-4 at |u| ≈ 20.
        let tol = f32_paths_bound(&PRENORM_PATH, max_abs(&full));
        assert!(
            d <= tol,
            "compacted cache differs from recomputation by {d} (tol {tol:e})"
        );
    });
}

#[test]
fn missing_shard_is_a_clear_error() {
    let dir = crate::common::scratch_dir("teacher", "missing-shard");
    std::fs::copy(
        fixture("tiny-llama-tied").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let err = Teacher::load(&dir, Device::Cpu, Kind::Float)
        .err()
        .expect("load must fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("model-00001-of-00002.safetensors") && msg.contains("2 of 2"),
        "{msg}"
    );
}

#[test]
fn mismatched_shapes_are_a_clear_error() {
    let dir = crate::common::scratch_dir("teacher", "bad-shape");
    std::fs::copy(
        fixture("tiny-llama-tied").join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(fixture("tiny-llama-tied").join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"intermediate_size\": 160", "\"intermediate_size\": 128"),
    )
    .unwrap();
    let err = Teacher::load(&dir, Device::Cpu, Kind::Float)
        .err()
        .expect("load must fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("gate_proj") && msg.contains("[160, 64]"),
        "{msg}"
    );
}
