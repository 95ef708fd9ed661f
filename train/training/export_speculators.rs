//! `clover export --format speculators`: an EAGLE-3 head in vLLM speculators' layout
//! (`Eagle3SpeculatorConfig`, `speculators_model_type: "eagle3"`), which `vllm serve DIR` and
//! speculators' own `SpeculatorModel.from_pretrained` read (docs/heads.md §6.6). The config holds
//! only the keys that loader reads, every one written explicitly: the export refuses one with a
//! key missing or one the loader would not use.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Map, Value};
use tch::Tensor;

use crate::data::jobfiles::publish_dir;
use crate::formats::safetensors::write_tensors;
use crate::model::head_config::HeadConfig;
use crate::model::kinds::arch_of;
use crate::outputs::write_marker;
use crate::training::export::EXPORT_COMMAND;

/// The top-level keys `Eagle3SpeculatorConfig` (speculators 0.9.0) reads beyond a
/// `PretrainedConfig`'s generic ones.
pub const EAGLE3_CONFIG_KEYS: [&str; 12] = [
    "architectures",
    "draft_vocab_size",
    "eagle_aux_hidden_state_layer_ids",
    "embed_requires_grad",
    "fc_norm",
    "norm_before_fc",
    "norm_before_residual",
    "norm_output",
    "speculators_config",
    "speculators_model_type",
    "target_hidden_size",
    "transformer_layer_config",
];

/// The teacher's LLaMA keys the draft's `transformer_layer_config` carries (a `LlamaConfig`).
const LAYER_CONFIG_KEYS: [&str; 14] = [
    "architectures",
    "attention_bias",
    "head_dim",
    "hidden_act",
    "hidden_size",
    "intermediate_size",
    "max_position_embeddings",
    "mlp_bias",
    "model_type",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "tie_word_embeddings",
    "vocab_size",
];

/// The speculators config of an EAGLE-3 head over the teacher whose config.json is
/// `teacher_config`; `verifier` is what `speculators_config.verifier.name_or_path` names (the
/// teacher's directory or hub id, which vLLM and speculators open).
pub fn speculators_config(
    cfg: &HeadConfig,
    teacher_config: &Path,
    verifier: &str,
) -> Result<Value> {
    let arch = arch_of(cfg.options.head);
    let model_type = arch.speculators_model_type().with_context(|| {
        format!(
            "a {} head has no speculators layout",
            cfg.options.head.name()
        )
    })?;
    let text = std::fs::read_to_string(teacher_config)
        .with_context(|| format!("reading {}", teacher_config.display()))?;
    let teacher: Map<String, Value> = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", teacher_config.display()))?;
    let mut layer = Map::new();
    for key in LAYER_CONFIG_KEYS {
        let value = teacher.get(key).cloned();
        layer.insert(key.into(), value.unwrap_or(Value::Null));
    }
    // The draft's own layer count and RoPE (docs/heads.md §6.5: the base it trained with).
    layer.insert("num_hidden_layers".into(), 1.into());
    layer.insert(
        "rope_parameters".into(),
        json!({"rope_type": "default", "rope_theta": cfg.options.draft_rope_theta}),
    );
    let layers = teacher
        .get("num_hidden_layers")
        .and_then(Value::as_i64)
        .with_context(|| format!("{}: no num_hidden_layers", teacher_config.display()))?;
    let config = json!({
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": model_type,
        "transformer_layer_config": layer,
        "draft_vocab_size": cfg.options.draft_vocab.map_or(cfg.vocab_size, |n| n as i64),
        "target_hidden_size": cfg.hidden_size,
        "eagle_aux_hidden_state_layer_ids": arch.teacher_layers(&cfg.options, layers),
        "norm_before_residual": false,
        "norm_before_fc": false,
        "fc_norm": false,
        "norm_output": false,
        "embed_requires_grad": false,
        "speculators_config": {
            "algorithm": model_type,
            "proposal_methods": [{
                "proposal_type": "greedy",
                "speculative_tokens": arch.trained_depths(&cfg.options),
                "verifier_accept_k": 1,
                "accept_tolerance": 0.0,
            }],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": teacher.get("architectures")},
        },
    });
    check_keys(&config)?;
    Ok(config)
}

/// The written keys are exactly those the loader reads.
fn check_keys(config: &Value) -> Result<()> {
    let written: Vec<&str> = config
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let missing: Vec<&str> = EAGLE3_CONFIG_KEYS
        .iter()
        .copied()
        .filter(|k| !written.contains(k))
        .collect();
    let unused: Vec<&str> = written
        .iter()
        .copied()
        .filter(|k| !EAGLE3_CONFIG_KEYS.contains(k))
        .collect();
    ensure!(
        missing.is_empty() && unused.is_empty(),
        "speculators export: config keys missing {missing:?}, not read by its loader {unused:?}"
    );
    Ok(())
}

/// Writes `out/model.safetensors` (the head's tensors under speculators' names, which are
/// clover's, plus `d2t`/`t2d` and, when given, the frozen `embed_tokens.weight`) and
/// `out/config.json`, all or nothing.
pub fn export_speculators(
    cfg: &HeadConfig,
    tensors: &BTreeMap<String, Tensor>,
    (teacher_config, verifier): (&Path, &str),
    frozen: Option<&Tensor>,
    out: &Path,
) -> Result<()> {
    let config = speculators_config(cfg, teacher_config, verifier)?;
    let all = crate::training::export::export_tensors(cfg, tensors, frozen)?;
    publish_dir(out, |dir| {
        write_marker(dir, EXPORT_COMMAND)?;
        write_tensors(&dir.join("model.safetensors"), &all)?;
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&config)?)
            .with_context(|| format!("writing {}", path.display()))
    })
}
