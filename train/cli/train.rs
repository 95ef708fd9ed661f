//! `clover train` and `clover bench-train`: load a training config and run the trainer.

use std::path::PathBuf;

use anyhow::Result;
use tch::Kind;

use crate::data::shards::{read_split, Split};
use crate::distributed::{Backend, Launch};
use crate::model::device::{parse_device, RunOn};
use crate::model::random::TeacherSource;
use crate::model::teacher::Teacher;
use crate::training::bench::BenchMode;
use crate::training::config::{Profile, TrainConfig, TrainOptions, DEFAULT_LOSS_CHUNK};
use crate::training::run_dir::Start;
use crate::training::targets::DistillCache;
use crate::training::trainer::{train, Source};

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// TOML training config (see configs/*.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Continue from the newest checkpoint in the config's out dir.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Start over in an out dir that holds a previous run: its checkpoints, metrics and
    /// TensorBoard logs are removed first (nothing else there is touched).
    #[arg(long)]
    pub overwrite: bool,
    /// Which overrides apply: `cuda` applies the config's [cuda] table, `cpu` ignores it, `auto`
    /// applies it when the run lands on a CUDA device.
    #[arg(long, value_enum, default_value_t = Profile::Auto)]
    pub profile: Profile,
    /// Override a config key, after the profile: `--set head="eagle1" --set max_steps=5
    /// --set out_dir=/tmp/run` (VALUE is TOML, or a plain string). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// The c10d backend of a data-parallel run (launched by torchrun or srun): NCCL on CUDA and
    /// Gloo on the CPU by default.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub dist_backend: Backend,
}

impl TrainArgs {
    fn start(&self) -> Start {
        match (self.resume, self.overwrite) {
            (true, _) => Start::Resume,
            (_, true) => Start::Overwrite,
            _ => Start::Fresh,
        }
    }
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let cfg = TrainConfig::load_with_overrides(&args.config, args.profile, &args.overrides)?;
    let launch = Launch::from_env()?;
    let device = match (parse_device(&cfg.device)?, &launch) {
        // One device per rank: cuda:LOCAL_RANK.
        (tch::Device::Cuda(_), Some(launch)) => tch::Device::Cuda(launch.local_rank),
        (device, _) => device,
    };
    let group = match &launch {
        Some(launch) => Some(launch.join(args.dist_backend.resolve(device.is_cuda()))?),
        None => None,
    };
    // The frozen teacher runs in the autocast dtype (bf16 on CUDA by default), else in f32.
    let teacher_kind = cfg.autocast_kind(device).unwrap_or(Kind::Float);
    let teacher = Teacher::load(&cfg.model_dir, device, teacher_kind)?;
    let source = match &cfg.distill_cache {
        Some(dir) => Source::Offline(DistillCache::open(dir)?),
        None => Source::Online(read_split(&cfg.data_dir, Split::Train)?),
    };
    let eval = read_split(&cfg.data_dir, Split::Eval)?;
    let outcome = train(
        &cfg,
        &teacher,
        source,
        eval,
        args.start(),
        &TrainOptions::default(),
        group.as_ref(),
    )?;
    if let Some(last) = outcome.evals.last() {
        eprintln!(
            "final eval: loss {:.4}, chained top-1 per depth {:?} (unigram baseline {:.3})",
            last.loss, last.chained_top1, last.unigram_top1
        );
    }
    if let Some(ck) = outcome.last_checkpoint {
        eprintln!("last checkpoint: {}", ck.display());
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub teacher: TeacherSource,
    #[command(flatten)]
    pub run_on: RunOn,
    /// offline (head on cached teacher states), online (teacher forward included) or both.
    #[arg(long, value_enum, default_value_t = BenchMode::Both)]
    pub mode: BenchMode,
    /// Timed optimizer steps (after one warm-up step).
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 5)]
    pub steps: usize,
    /// Rows per batch.
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 2)]
    pub batch: usize,
    /// Tokens per row (all trained: loss mask 1).
    #[arg(long, value_parser = crate::checks::sequence_length, default_value_t = 256)]
    pub seq_len: usize,
    #[arg(long, value_parser = crate::checks::positive_i64, default_value_t = 5)]
    pub num_depths: i64,
    /// Masked positions per lm_head pass of the loss, as the training config's `loss_chunk`
    /// (0 = unchunked: the whole [M,V] teacher distribution and every depth's logits at once).
    #[arg(long, value_parser = crate::checks::count, default_value_t = DEFAULT_LOSS_CHUNK)]
    pub loss_chunk: usize,
}

impl BenchTrainArgs {
    /// The library's plain options for this command line.
    pub fn options(&self) -> crate::training::bench::BenchTrainOptions {
        crate::training::bench::BenchTrainOptions {
            teacher: self.teacher.clone(),
            run_on: self.run_on.clone(),
            mode: self.mode,
            steps: self.steps,
            batch: self.batch,
            seq_len: self.seq_len,
            num_depths: self.num_depths,
            loss_chunk: self.loss_chunk,
        }
    }
}

pub fn run_bench(args: &BenchTrainArgs) -> Result<()> {
    crate::training::bench::run_bench(&args.options())
}
