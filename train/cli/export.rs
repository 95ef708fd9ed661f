//! `clover export`: a training checkpoint as the reference's safetensors layout.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tch::Kind;

use crate::outputs::{check_replaceable, refuse_overlap};
use crate::training::checkpoint::{read_checkpoint_head, resolve_checkpoint, CK_TEACHER_CONFIG};
use crate::training::export::{export_head, is_export_file, ExportFormat, EXPORT_COMMAND};
use crate::training::export_speculators::export_speculators;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint dir (<out>/checkpoints/step-XXXXXXXX), or a training out dir / `<out>/latest`
    /// for its newest checkpoint.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output dir (created; a previous export there is replaced only with --overwrite, and a
    /// directory holding anything else never).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace a previous export at --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Also write the frozen tensors of the head's full state dict: Clover-2's `lm_head.weight`
    /// and `clover_embed_tokens.weight` (optional: the reference's loader is strict=False and
    /// takes them from the base model; large, 2·V·H values), EAGLE-1's `embed_tokens.weight`
    /// (EAGLE's loader is strict, so its repository needs it); nothing for Medusa.
    #[arg(long)]
    pub with_frozen: bool,
    /// Teacher dir, needed only with --with-frozen (its lm_head weight).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The layout: `clover` (the head kind's reference layout, which clover loads) or
    /// `speculators` (vLLM speculators' EAGLE-3 layout).
    #[arg(long, value_enum, default_value_t = ExportFormat::Clover)]
    pub format: ExportFormat,
    /// With --format speculators: the teacher as its loaders should open it
    /// (`speculators_config.verifier.name_or_path`: a directory or hub id).
    #[arg(long)]
    pub verifier: Option<String>,
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let checkpoint = resolve_checkpoint(&args.checkpoint)?;
    check_output(args, &checkpoint)?;
    let (cfg, tensors) = read_checkpoint_head(&checkpoint)?;
    let teacher_config = checkpoint.join(CK_TEACHER_CONFIG);
    let frozen = if args.with_frozen {
        let model = args
            .model
            .as_ref()
            .context("--with-frozen needs --model <teacher dir>")?;
        let teacher = crate::model::teacher::Teacher::load(model, tch::Device::Cpu, Kind::Float)?;
        let table = crate::model::kinds::arch_of(cfg.options.head).token_table();
        Some(table.of(&teacher)?.shallow_clone())
    } else {
        None
    };
    match args.format {
        ExportFormat::Clover => {
            export_head(&cfg, &tensors, &teacher_config, frozen.as_ref(), &args.out)?
        }
        ExportFormat::Speculators => {
            let verifier = args
                .verifier
                .as_deref()
                .context("--format speculators needs --verifier <teacher dir or hub id>")?;
            export_speculators(
                &cfg,
                &tensors,
                (&teacher_config, verifier),
                frozen.as_ref(),
                &args.out,
            )?
        }
    }
    write_provenance(&checkpoint, &args.out)?;
    eprintln!(
        "exported {} to {}",
        checkpoint.display(),
        args.out.display()
    );
    Ok(())
}

/// Before any work: --out is none of the inputs and holds none (so never the training run the
/// checkpoint lives in), and holds nothing but a previous export, replaced only with --overwrite.
fn check_output(args: &ExportArgs, checkpoint: &std::path::Path) -> Result<()> {
    let mut inputs = vec![("--checkpoint", checkpoint)];
    inputs.extend(args.model.as_deref().map(|m| ("--model", m)));
    refuse_overlap(("--out", &args.out), &inputs)?;
    check_replaceable(&args.out, EXPORT_COMMAND, args.overwrite, &is_export_file)?;
    Ok(())
}

/// Records which checkpoint and training run the export came from, so `clover report` can find
/// the run's logs. A checkpoint lives at `<run>/checkpoints/step-N`.
fn write_provenance(checkpoint: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let checkpoint = checkpoint
        .canonicalize()
        .with_context(|| format!("resolving {}", checkpoint.display()))?;
    let run_dir = checkpoint
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    let p = crate::training::report::Provenance {
        checkpoint,
        run_dir,
    };
    let file = out.join(crate::training::report::PROVENANCE_FILE);
    std::fs::write(&file, serde_json::to_string_pretty(&p)?)
        .with_context(|| format!("writing {}", file.display()))
}
