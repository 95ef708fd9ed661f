//! `clover export`: a training checkpoint as the reference's safetensors layout.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tch::Kind;

use crate::training::checkpoint::{read_checkpoint_head, resolve_checkpoint, CK_TEACHER_CONFIG};
use crate::training::export::export_head;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint dir (<out>/checkpoints/step-XXXXXXXX), or a training out dir / `<out>/latest`
    /// for its newest checkpoint.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output dir (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the frozen `lm_head.weight` and `clover_embed_tokens.weight` (the reference's
    /// full state dict has them; its loader uses strict=False and takes them from the base model,
    /// so they are optional, and large: 2·V·H values).
    #[arg(long)]
    pub with_frozen: bool,
    /// Teacher dir, needed only with --with-frozen (its lm_head weight).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let checkpoint = resolve_checkpoint(&args.checkpoint)?;
    let (cfg, tensors) = read_checkpoint_head(&checkpoint)?;
    let teacher_config = checkpoint.join(CK_TEACHER_CONFIG);
    let frozen = if args.with_frozen {
        let model = args
            .model
            .as_ref()
            .context("--with-frozen needs --model <teacher dir>")?;
        let teacher = crate::model::teacher::Teacher::load(model, tch::Device::Cpu, Kind::Float)?;
        Some(teacher.lm_head_weight().shallow_clone())
    } else {
        None
    };
    export_head(&cfg, &tensors, &teacher_config, frozen.as_ref(), &args.out)?;
    eprintln!(
        "exported {} to {}",
        checkpoint.display(),
        args.out.display()
    );
    Ok(())
}
