//! `clover export`: a training checkpoint to the reference's format, a directory with
//! `model.safetensors` (the reference state-dict names, docs/clover2.md §1.4) and `config.json` (the teacher's
//! LlamaConfig fields, `num_hidden_layers: 1` as the reference's draft configs, plus the `"clover"`
//! section of `ConfigClover`, and our `"clover_rs"` extras such as the draft RoPE base).
//! `DraftHead::load` reads it back, and training can start from it (`init_from`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use tch::{Kind, Tensor};

use crate::data::jobfiles::publish_dir;
use crate::formats::safetensors::write_tensors;
use crate::model::draft_vocab::{mapping_of_d2t, D2T};
use crate::model::head::check_head_tensors;
use crate::model::head_config::HeadConfig;
use crate::model::kinds::{arch_of, ALL_KINDS};
use crate::outputs::write_marker;

/// The layout `clover export` writes, parsed once from `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ExportFormat {
    /// The head kind's reference layout, which clover reads back (`DraftHead::load`).
    #[default]
    Clover,
    /// vLLM speculators' (EAGLE-3 heads), for `vllm serve` and speculators' loader.
    Speculators,
}

/// The command an export's marker names.
pub const EXPORT_COMMAND: &str = "clover export";

/// Whether `name` is a file an export writes (recognises exports made before markers existed).
pub fn is_export_file(name: &str) -> bool {
    name == "config.json"
        || name == crate::training::report::PROVENANCE_FILE
        || ALL_KINDS
            .iter()
            .any(|&kind| name == arch_of(kind).weights_file())
}

/// The reference draft config: the teacher's config.json with num_hidden_layers = 1 and the
/// `"clover"` section; our extras go under `"clover_rs"`.
pub fn export_config(cfg: &HeadConfig, teacher_config: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(teacher_config)
        .with_context(|| format!("reading {}", teacher_config.display()))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", teacher_config.display()))?;
    let obj = v
        .as_object_mut()
        .with_context(|| format!("{} is not a JSON object", teacher_config.display()))?;
    obj.insert("num_hidden_layers".into(), 1.into());
    // The draft runs RoPE unscaled with its own base (docs/clover2.md G2): say so, instead of
    // handing a loader the teacher's scaling, which would rescale the draft's positions or, for
    // a llama3-style scaling, be refused by the reference's loader.
    obj.insert("rope_scaling".into(), serde_json::Value::Null);
    obj.remove("rope_parameters");
    obj.insert("rope_theta".into(), cfg.options.draft_rope_theta.into());
    obj.insert("clover".into(), cfg.clover_section());
    obj.insert("clover_rs".into(), cfg.clover_rs_section());
    arch_of(cfg.options.head).export_config_keys(&cfg.options, obj);
    Ok(v)
}

/// Writes `out/model.safetensors` + `out/config.json` after checking every required key and shape;
/// `frozen` = the teacher tensor of the kind's `frozen_names` (its `token_table`: Clover-2's
/// lm_head weight, written as lm_head.weight and clover_embed_tokens.weight; EAGLE-1's
/// embed_tokens; Medusa: none).
pub fn export_head(
    cfg: &HeadConfig,
    tensors: &BTreeMap<String, Tensor>,
    teacher_config: &Path,
    frozen: Option<&Tensor>,
    out: &Path,
) -> Result<()> {
    let arch = arch_of(cfg.options.head);
    let config = export_config(cfg, teacher_config)?;
    let all = export_tensors(cfg, tensors, frozen)?;
    let weights_file = arch.weights_file();
    // All or nothing: the head is written into a temporary directory, read back as a head, and
    // only then renamed to `out`, so a full disk never leaves half an export.
    publish_dir(out, |dir| {
        write_marker(dir, EXPORT_COMMAND)?;
        write_tensors(&dir.join(weights_file), &all)?;
        let cfg_path = dir.join("config.json");
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&config)?)
            .with_context(|| format!("writing {}", cfg_path.display()))?;
        let back = crate::model::head::read_head_tensors(
            &dir.join(weights_file),
            &HeadConfig::from_export_json(&cfg_path)?,
        )?;
        ensure!(
            back.len() == tensors.len(),
            "export check: {} tensors read back, {} written",
            back.len(),
            tensors.len()
        );
        Ok(())
    })
}

/// The state dict an export writes, after checking every required key and shape: the
/// trainable tensors in f32, the draft vocabulary's `d2t`/`t2d` pair (EAGLE-3's: the offsets,
/// and the membership mask its loaders also read), and `frozen` under the kind's
/// `frozen_names`.
pub fn export_tensors(
    cfg: &HeadConfig,
    tensors: &BTreeMap<String, Tensor>,
    frozen: Option<&Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    check_head_tensors(cfg, tensors, "export")?;
    let arch = arch_of(cfg.options.head);
    let mut all: BTreeMap<String, Tensor> = arch
        .trainable_shapes(cfg)
        .into_iter()
        .map(|(n, _)| (n.clone(), tensors[&n].to_kind(Kind::Float)))
        .collect();
    if let Some(d2t) = tensors.get(D2T) {
        for (name, t) in mapping_of_d2t(d2t, cfg.vocab_size)? {
            all.insert(name.to_string(), t);
        }
    }
    if let Some(w) = frozen {
        ensure!(
            w.size() == [cfg.vocab_size, cfg.hidden_size],
            "frozen teacher weight has shape {:?}, expected [{}, {}]",
            w.size(),
            cfg.vocab_size,
            cfg.hidden_size
        );
        for name in arch.frozen_names() {
            all.insert((*name).into(), w.to_kind(Kind::Float));
        }
    }
    Ok(all)
}
