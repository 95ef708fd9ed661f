//! `clover import-gguf`: turns a llama-family GGUF file into an HF-style model directory
//! (model.safetensors in f32, config.json, tokenizer.json, tokenizer_config.json,
//! generation_config.json) that `teacher::Teacher::load` and HF transformers both read.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value as Json};

use crate::formats::gguf::{GgufFile, TensorInfo};
use crate::formats::gguf_tokenizer::{
    tokenizer_config_json, tokenizer_json, validate_tokenizer, TokenizerMeta,
};
use crate::progress::Progress;

/// Architectures whose GGUF tensors map 1:1 onto HF's LlamaForCausalLM.
const SUPPORTED_ARCHS: &[&str] = &["llama", "mistral"];
/// The files an import writes; an existing output dir holding only these may be replaced.
const OUTPUT_FILES: &[&str] = &[
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

/// Whether `name` is a file an import writes.
pub fn is_import_file(name: &str) -> bool {
    OUTPUT_FILES.contains(&name)
}

#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub out_dir: PathBuf,
    pub architecture: String,
    pub tensors: usize,
    pub parameters: u64,
    /// ggml type name -> number of tensors of that type in the GGUF.
    pub types_seen: BTreeMap<String, usize>,
    pub num_hidden_layers: i64,
    pub vocab_size: i64,
    pub tie_word_embeddings: bool,
}

/// Imports `gguf` into the HF-style directory `out`. Everything is written into a sibling temp
/// dir first and renamed at the end, so a failed import leaves nothing half-written.
pub fn import_gguf(gguf: &Path, out: &Path) -> Result<ImportSummary> {
    let file = GgufFile::open(gguf)?;
    let ctx = || format!("importing {}", gguf.display());
    let model = ModelMeta::read(&file).with_context(ctx)?;
    let tensors = plan_tensors(&file, &model).with_context(ctx)?;
    check_out_dir(out)?;

    let staging = StagingDir::create(out)?;
    let dir = staging.path.clone();
    let write = || -> Result<()> {
        let config = config_json(&file, &model)?;
        write_json(&dir.join("config.json"), &config)?;
        write_json(
            &dir.join("generation_config.json"),
            &generation_config_json(&config),
        )?;
        let tok = TokenizerMeta::read(&file)?;
        write_json(&dir.join("tokenizer.json"), &tokenizer_json(&tok)?)?;
        validate_tokenizer(&dir.join("tokenizer.json"), tok.tokens.len())?;
        write_json(
            &dir.join("tokenizer_config.json"),
            &tokenizer_config_json(&file, &tok, &model.arch)?,
        )?;
        write_safetensors(&file, &tensors, &dir.join("model.safetensors"))
    };
    write().with_context(ctx)?;
    staging.commit(out)?;

    let mut types_seen = BTreeMap::new();
    for t in &file.tensors {
        *types_seen.entry(t.ggml_type.name()).or_insert(0) += 1;
    }
    Ok(ImportSummary {
        out_dir: out.to_path_buf(),
        architecture: model.arch.clone(),
        tensors: tensors.len(),
        parameters: file.tensors.iter().map(TensorInfo::n_elements).sum(),
        types_seen,
        num_hidden_layers: model.n_layers,
        vocab_size: model.vocab_size,
        tie_word_embeddings: model.tied,
    })
}

/// The hyper-parameters we need from `{arch}.*` metadata.
pub(crate) struct ModelMeta {
    pub(crate) arch: String,
    pub(crate) n_layers: i64,
    pub(crate) hidden: i64,
    pub(crate) n_head: i64,
    pub(crate) n_head_kv: i64,
    pub(crate) head_dim: i64,
    pub(crate) vocab_size: i64,
    pub(crate) tied: bool,
}

impl ModelMeta {
    fn read(f: &GgufFile) -> Result<Self> {
        let arch = f
            .get_str("general.architecture")?
            .ok_or_else(|| anyhow!("metadata general.architecture is missing"))?;
        ensure!(
            SUPPORTED_ARCHS.contains(&arch),
            "unsupported architecture '{arch}': only llama-family models ({}) can be imported",
            SUPPORTED_ARCHS.join(", ")
        );
        let experts = f.get_i64(&format!("{arch}.expert_count"))?.unwrap_or(0);
        ensure!(
            experts == 0,
            "mixture-of-experts models ({arch}.expert_count = {experts}) are not supported"
        );
        let hidden = required_i64(f, &format!("{arch}.embedding_length"))?;
        let n_head = required_i64(f, &format!("{arch}.attention.head_count"))?;
        let n_head_kv = f
            .get_i64(&format!("{arch}.attention.head_count_kv"))?
            .unwrap_or(n_head);
        ensure!(
            n_head > 0 && n_head_kv > 0 && n_head % n_head_kv == 0,
            "bad head counts {n_head}/{n_head_kv}"
        );
        let head_dim = f
            .get_i64(&format!("{arch}.attention.key_length"))?
            .unwrap_or(hidden / n_head);
        if let Some(rot) = f.get_i64(&format!("{arch}.rope.dimension_count"))? {
            // HF's LlamaForCausalLM always rotates the whole head.
            ensure!(rot == head_dim, "partial rotary embeddings (rope.dimension_count {rot} != head_dim {head_dim}) are not supported");
        }
        let embd = f
            .tensor("token_embd.weight")
            .ok_or_else(|| anyhow!("tensor token_embd.weight is missing"))?;
        ensure!(
            embd.dims.len() == 2,
            "tensor token_embd.weight has dims {:?}, expected 2",
            embd.dims
        );
        Ok(ModelMeta {
            arch: arch.to_string(),
            n_layers: required_i64(f, &format!("{arch}.block_count"))?,
            hidden,
            n_head,
            n_head_kv,
            head_dim,
            vocab_size: embd.dims[1] as i64,
            tied: f.tensor("output.weight").is_none(),
        })
    }
}

fn required_i64(f: &GgufFile, key: &str) -> Result<i64> {
    f.get_i64(key)?
        .ok_or_else(|| anyhow!("metadata key {key} is missing"))
}

/// GGUF stores f32; widening f32(1e-5) gives 9.999999747378752e-06. The shortest decimal that
/// round-trips the f32 recovers the value the model was trained with (1e-5), as HF configs have it.
fn f32_meta_to_f64(v: f64) -> f64 {
    let s = format!("{}", v as f32);
    s.parse().unwrap_or(v)
}

/// One output tensor: where it comes from and how to undo llama.cpp's conversion.
struct PlannedTensor<'a> {
    hf_name: String,
    info: &'a TensorInfo,
    /// `Some(n_heads)` for q/k projections, whose rows llama.cpp permuted.
    unpermute_heads: Option<usize>,
}

/// Maps every GGUF tensor to its HF name, failing on anything the HF llama layout has no place
/// for and on types we cannot dequantize (naming the tensor and type) before writing anything.
fn plan_tensors<'a>(f: &'a GgufFile, m: &ModelMeta) -> Result<Vec<PlannedTensor<'a>>> {
    let mut planned = Vec::new();
    for info in &f.tensors {
        let hf_name = hf_tensor_name(&info.name)?;
        ensure!(
            info.ggml_type.can_dequantize(),
            "tensor {} has unsupported type {} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)",
            info.name,
            info.ggml_type.name()
        );
        let unpermute_heads = if info.name.contains(".attn_q.") {
            Some(m.n_head as usize)
        } else if info.name.contains(".attn_k.") {
            Some(m.n_head_kv as usize)
        } else {
            None
        };
        if let Some(heads) = unpermute_heads {
            let rows = info.dims.get(1).copied().unwrap_or(info.dims[0]) as i64;
            ensure!(
                rows == heads as i64 * m.head_dim,
                "tensor {}: {rows} rows, expected {heads} heads x head_dim {}",
                info.name,
                m.head_dim
            );
        }
        planned.push(PlannedTensor {
            hf_name,
            info,
            unpermute_heads,
        });
    }
    Ok(planned)
}

/// GGUF (llama.cpp) tensor name -> HF LlamaForCausalLM parameter name.
pub fn hf_tensor_name(gguf_name: &str) -> Result<String> {
    let (stem, kind) = gguf_name
        .rsplit_once('.')
        .filter(|(_, k)| *k == "weight" || *k == "bias")
        .ok_or_else(|| anyhow!("tensor {gguf_name}: name does not end in .weight or .bias"))?;
    let hf_stem = match stem {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        "rope_freqs" => bail!(
            "tensor {gguf_name}: llama3-style rope frequency factors cannot be turned back into an HF rope_scaling config"
        ),
        _ => {
            let rest = stem.strip_prefix("blk.").ok_or_else(|| anyhow!("tensor {gguf_name}: unknown tensor name"))?;
            let (layer, part) =
                rest.split_once('.').ok_or_else(|| anyhow!("tensor {gguf_name}: unknown tensor name"))?;
            let layer: usize = layer.parse().map_err(|_| anyhow!("tensor {gguf_name}: bad layer index '{layer}'"))?;
            let hf_part = match part {
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                _ => bail!("tensor {gguf_name}: '{part}' has no counterpart in HF's LlamaForCausalLM"),
            };
            format!("model.layers.{layer}.{hf_part}")
        }
    };
    Ok(format!("{hf_stem}.{kind}"))
}

/// llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py) on a row-major [rows, cols] matrix:
/// `w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)`, i.e. HF's
/// half-split rotary row order to ggml's interleaved one. Kept for the round-trip test.
pub fn permute_rows(w: &[f32], cols: usize, n_head: usize) -> Result<Vec<f32>> {
    reorder_rows(w, cols, n_head, false)
}

/// The inverse of [`permute_rows`]: ggml interleaved rotary row order back to HF's half-split.
pub fn unpermute_rows(w: &[f32], cols: usize, n_head: usize) -> Result<Vec<f32>> {
    reorder_rows(w, cols, n_head, true)
}

/// Within each head of `head_dim = 2*half` rows, HF row `s*half + d` (s in 0..2, d in 0..half)
/// is ggml row `2*d + s`.
fn reorder_rows(w: &[f32], cols: usize, n_head: usize, to_hf: bool) -> Result<Vec<f32>> {
    ensure!(
        cols > 0 && w.len().is_multiple_of(cols),
        "{} values are not rows of {cols}",
        w.len()
    );
    let rows = w.len() / cols;
    ensure!(
        n_head > 0 && rows.is_multiple_of(2 * n_head),
        "{rows} rows cannot be split into {n_head} heads of even size"
    );
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for d in 0..half {
                let hf_row = h * head_dim + s * half + d;
                let ggml_row = h * head_dim + 2 * d + s;
                let (src, dst) = if to_hf {
                    (ggml_row, hf_row)
                } else {
                    (hf_row, ggml_row)
                };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// Dequantizes (in parallel over tensors and blocks) and writes all tensors as f32.
/// f32 rather than bf16: Q4_1 values d*q+m are not exactly representable in bf16, and f32 keeps
/// the imported weights bit-identical to what transformers' GGUF loader produces.
fn write_safetensors(f: &GgufFile, tensors: &[PlannedTensor], path: &Path) -> Result<()> {
    let mut bar = Progress::new("import (tensors)", tensors.len() as u64);
    let data: Vec<Vec<u8>> = tensors
        .par_iter()
        .map(|t| -> Result<Vec<u8>> {
            let mut values = f.dequantize(t.info)?;
            if let Some(heads) = t.unpermute_heads {
                values = unpermute_rows(&values, t.info.dims[0] as usize, heads)
                    .with_context(|| format!("un-permuting tensor {}", t.info.name))?;
            }
            bar.inc(1);
            Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect::<Result<_>>()?;
    bar.finish();
    let views = tensors
        .iter()
        .zip(&data)
        .map(|(t, bytes)| {
            let view = TensorView::new(Dtype::F32, t.info.torch_shape(), bytes)
                .map_err(|e| anyhow!("tensor {}: {e}", t.info.name))?;
            Ok((t.hf_name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut info = std::collections::HashMap::new();
    info.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(info), path)
        .with_context(|| format!("writing {}", path.display()))
}

fn config_json(f: &GgufFile, m: &ModelMeta) -> Result<Json> {
    let a = &m.arch;
    let token_id = |k: &str| f.get_i64(&format!("tokenizer.ggml.{k}_token_id"));
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.hidden,
        "intermediate_size": required_i64(f, &format!("{a}.feed_forward_length"))?,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.n_head_kv,
        "head_dim": m.head_dim,
        "vocab_size": m.vocab_size,
        "rms_norm_eps": f32_meta_to_f64(required_f64(f, &format!("{a}.attention.layer_norm_rms_epsilon"))?),
        "rope_theta": f32_meta_to_f64(f.get_f64(&format!("{a}.rope.freq_base"))?.unwrap_or(10000.0)),
        "max_position_embeddings": f.get_i64(&format!("{a}.context_length"))?.unwrap_or(2048),
        "tie_word_embeddings": m.tied,
        "bos_token_id": token_id("bos")?,
        "eos_token_id": token_id("eos")?,
        "pad_token_id": token_id("padding")?,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32",
    });
    if let Some(scaling) = rope_scaling_json(f, a)? {
        c["rope_scaling"] = scaling;
    }
    Ok(c)
}

fn required_f64(f: &GgufFile, key: &str) -> Result<f64> {
    f.get_f64(key)?
        .ok_or_else(|| anyhow!("metadata key {key} is missing"))
}

/// `{arch}.rope.scaling.*` (linear / yarn style) as an HF rope_scaling object, if any.
fn rope_scaling_json(f: &GgufFile, a: &str) -> Result<Option<Json>> {
    let Some(kind) = f.get_str(&format!("{a}.rope.scaling.type"))? else {
        return Ok(None);
    };
    if kind == "none" {
        return Ok(None);
    }
    let factor = required_f64(f, &format!("{a}.rope.scaling.factor"))?;
    let mut s = json!({ "rope_type": kind, "type": kind, "factor": f32_meta_to_f64(factor) });
    if let Some(orig) = f.get_i64(&format!("{a}.rope.scaling.original_context_length"))? {
        s["original_max_position_embeddings"] = json!(orig);
    }
    Ok(Some(s))
}

fn generation_config_json(config: &Json) -> Json {
    json!({
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    })
}

fn write_json(path: &Path, value: &Json) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Refuses to clobber a directory that holds anything but a previous import.
fn check_out_dir(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    ensure!(
        out.is_dir(),
        "output {} exists and is not a directory",
        out.display()
    );
    for entry in fs::read_dir(out).with_context(|| format!("listing {}", out.display()))? {
        let name = entry?.file_name();
        ensure!(
            OUTPUT_FILES.iter().any(|f| name == *f),
            "output dir {} contains {:?}, which an import does not write; refusing to replace it",
            out.display(),
            name
        );
    }
    Ok(())
}

/// A sibling temp dir of the output; removed on drop unless committed.
struct StagingDir {
    path: PathBuf,
    committed: bool,
}

impl StagingDir {
    fn create(out: &Path) -> Result<Self> {
        let name = out
            .file_name()
            .ok_or_else(|| anyhow!("output path {} has no final component", out.display()))?;
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let path = parent.join(format!(
            ".{}.import-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        if path.exists() {
            fs::remove_dir_all(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(StagingDir {
            path,
            committed: false,
        })
    }

    fn commit(mut self, out: &Path) -> Result<()> {
        if out.exists() {
            fs::remove_dir_all(out)
                .with_context(|| format!("removing the previous import {}", out.display()))?;
        }
        fs::rename(&self.path, out)
            .with_context(|| format!("renaming {} to {}", self.path.display(), out.display()))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::dequant::GgmlType;

    #[test]
    fn permute_matches_llama_cpp_row_order() {
        // 2 heads of head_dim 6 (half 3), one column holding the row index: llama.cpp's
        // reshape(2, 2, 3).swapaxes(1, 2) puts HF rows [0,3,1,4,2,5] of each head in order.
        let w: Vec<f32> = (0..12).map(|r| r as f32).collect();
        let p = permute_rows(&w, 1, 2).unwrap();
        assert_eq!(p, vec![0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.]);
    }

    #[test]
    fn unpermute_inverts_permute_on_a_matrix() {
        let (rows, cols) = (3 * 8, 5);
        let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = permute_rows(&w, cols, 3).unwrap();
        assert_ne!(p, w);
        assert_eq!(unpermute_rows(&p, cols, 3).unwrap(), w);
        assert_eq!(
            permute_rows(&unpermute_rows(&w, cols, 3).unwrap(), cols, 3).unwrap(),
            w
        );
    }

    #[test]
    fn permute_rejects_rows_not_divisible_into_heads() {
        assert!(unpermute_rows(&[0.0; 10], 1, 3).is_err());
        assert!(unpermute_rows(&[0.0; 10], 3, 1).is_err());
    }

    #[test]
    fn maps_gguf_names_to_hf_names() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "blk.12.attn_k.weight",
                "model.layers.12.self_attn.k_proj.weight",
            ),
            (
                "blk.3.attn_v.weight",
                "model.layers.3.self_attn.v_proj.weight",
            ),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.29.ffn_gate.weight",
                "model.layers.29.mlp.gate_proj.weight",
            ),
            ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
            (
                "blk.29.ffn_down.weight",
                "model.layers.29.mlp.down_proj.weight",
            ),
            (
                "blk.1.attn_norm.weight",
                "model.layers.1.input_layernorm.weight",
            ),
            (
                "blk.1.ffn_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
        ];
        for (gguf, hf) in cases {
            assert_eq!(hf_tensor_name(gguf).unwrap(), hf, "{gguf}");
        }
        for bad in [
            "blk.0.ffn_gate_exps.weight",
            "blk.x.attn_q.weight",
            "rope_freqs.weight",
            "token_embd",
        ] {
            let err = hf_tensor_name(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn f32_metadata_recovers_the_decimal_value() {
        assert_eq!(f32_meta_to_f64(f64::from(1e-5f32)), 1e-5);
        assert_eq!(f32_meta_to_f64(100000.0), 100000.0);
    }

    #[test]
    fn gguf_type_names_and_support() {
        assert_eq!(GgmlType::Q4_1.name(), "Q4_1");
        assert_eq!(GgmlType(13).name(), "Q5_K");
        assert!(!GgmlType(13).can_dequantize());
        assert_eq!(GgmlType(99).name(), "ggml type 99");
    }
}
