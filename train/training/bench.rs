//! `clover bench-train`: tokens/s and peak memory of the training step, as one JSON line.

use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::data::shards::Sample;
use crate::model::device::RunOn;
use crate::model::head::DraftHead;
use crate::model::head_config::HeadConfig;
use crate::model::random::TeacherSource;
use crate::training::batches::{make_batch, SplitMix64};
use crate::training::loss::{BatchLoss, LossWeights};
use crate::training::optimizer::{clip_grads_by_value, zero_grads, AdamW};

/// Which training step `bench-train` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchMode {
    /// The head on cached teacher states (the distill-cache setting): head forward/backward,
    /// loss, clipping, AdamW.
    Offline,
    /// The same with the teacher forward inside the step.
    Online,
    /// Offline, then online, one JSON line each.
    Both,
}

#[derive(Debug)]
pub struct BenchTrainOptions {
    /// A teacher model dir, or a random teacher of a named architecture.
    pub teacher: TeacherSource,
    pub run_on: RunOn,
    pub mode: BenchMode,
    /// Timed optimizer steps (after one warm-up step).
    pub steps: usize,
    /// Rows per batch.
    pub batch: usize,
    /// Tokens per row (all trained: loss mask 1).
    pub seq_len: usize,
    pub num_depths: i64,
    /// Masked positions per lm_head pass of the loss (0 = unchunked).
    pub loss_chunk: usize,
}

/// Throughput of the training step (offline: head forward/backward, loss and AdamW on cached
/// teacher states; online: the teacher forward included) on random tokens, one JSON line per
/// mode with `mode`, `tokens_per_s`, `ms_per_step`, `peak_bytes`, `device`, `dtype`, `batch`,
/// `seq_len`, `loss_chunk`. `peak_bytes` is the process's peak resident memory so far on the
/// CPU (VmHWM: run one mode per process for a clean figure) and, on CUDA, the caching
/// allocator's peak allocated bytes over the timed steps (read through `crate::native`).
pub fn run_bench(args: &BenchTrainOptions) -> Result<()> {
    let (device, kind) = args.run_on.resolve()?;
    let teacher = args.teacher.load(device, kind)?;
    let mut head_cfg = HeadConfig::from_teacher(&teacher.config);
    head_cfg.options.num_depths = args.num_depths;
    let mut head = DraftHead::new(&teacher, head_cfg, 0)?;
    if device.is_cuda() {
        head.set_compute_kind(Kind::BFloat16);
    }
    let params = head.named_tensors();
    let mut opt = AdamW::new(&params, (0.9, 0.95), 1e-8, 0.01);
    let weights = LossWeights::reference(head.config());
    let samples = random_samples(args, teacher.config.vocab_size as u64);
    let refs: Vec<&Sample> = samples.iter().collect();
    // The offline step's input: the teacher's states of this batch, computed once.
    let cached = make_batch(&teacher, &refs, None, args.seq_len)?;
    let lm_head = |i: usize, o: &Tensor| head.loss_logits_at(i as i64, o);
    let modes: &[BenchMode] = match args.mode {
        BenchMode::Both => &[BenchMode::Offline, BenchMode::Online],
        BenchMode::Offline => &[BenchMode::Offline],
        BenchMode::Online => &[BenchMode::Online],
    };
    for &mode in modes {
        let mut step = || -> Result<f64> {
            let fresh;
            let batch = match mode {
                BenchMode::Online => {
                    fresh = make_batch(&teacher, &refs, None, args.seq_len)?;
                    &fresh
                }
                _ => &cached,
            };
            let outs = head.depth_outputs(&batch.u, &batch.next_ids);
            let parts = BatchLoss {
                teacher: &teacher,
                u: &batch.u,
                mask: &batch.mask,
                outs: &outs,
                lm_head: &lm_head,
                weights: &weights,
                chunk: head.loss_chunk(args.loss_chunk),
                vocab: None,
                counts: None,
            }
            .compute()?;
            zero_grads(&params);
            parts.total.backward();
            clip_grads_by_value(&params, 0.5);
            opt.update(&params, 1e-3);
            Ok(parts.depths.iter().map(|d| d.loss).sum())
        };
        step()?; // warm-up
        sync(device);
        reset_peak(device)?;
        let started = Instant::now();
        let mut last = 0.0;
        for _ in 0..args.steps {
            last = step()?;
        }
        sync(device);
        let secs = started.elapsed().as_secs_f64();
        let measured = Measured {
            mode,
            seconds: secs,
            peak_bytes: peak_bytes(device)?,
            last_loss: last,
        };
        println!("{}", bench_report(args, &head, (device, kind), &measured));
    }
    Ok(())
}

/// `args.batch` rows of `args.seq_len` uniformly random token ids, all trained on.
fn random_samples(args: &BenchTrainOptions, vocab: u64) -> Vec<Sample> {
    let mut rng = SplitMix64::new(1);
    (0..args.batch)
        .map(|i| Sample {
            id: format!("bench{i}"),
            input_ids: (0..args.seq_len)
                .map(|_| (rng.next_u64() % vocab) as i64)
                .collect(),
            loss_mask: vec![1; args.seq_len],
        })
        .collect()
}

/// What one mode's timed steps measured.
struct Measured {
    mode: BenchMode,
    seconds: f64,
    peak_bytes: Option<u64>,
    last_loss: f64,
}

/// One JSON line per mode: the shape benchmarked and what it measured.
fn bench_report(
    args: &BenchTrainOptions,
    head: &DraftHead,
    (device, kind): (Device, Kind),
    m: &Measured,
) -> serde_json::Value {
    let tokens = (args.steps * args.batch * args.seq_len) as f64;
    serde_json::json!({
        "mode": format!("{:?}", m.mode).to_lowercase(),
        "model": args.teacher.describe(),
        "device": crate::model::device::device_name(device),
        "dtype": format!("{kind:?}"),
        "threads": tch::get_num_threads(),
        "trainable_parameters": head.num_parameters(),
        "num_depths": args.num_depths,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "loss_chunk": args.loss_chunk,
        "steps": args.steps,
        "seconds": m.seconds,
        "tokens_per_s": tokens / m.seconds,
        "ms_per_step": 1000.0 * m.seconds / args.steps as f64,
        "peak_bytes": m.peak_bytes,
        "peak_rss_mib": peak_rss_mib(),
        "last_loss": m.last_loss,
    })
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// On CUDA, starts the allocator's peak afresh so the report covers the timed steps only.
fn reset_peak(device: Device) -> Result<()> {
    match device {
        Device::Cuda(i) => crate::native::cuda_reset_peak(i),
        _ => Ok(()),
    }
}

/// The caching allocator's peak allocated bytes on CUDA; the process's peak RSS elsewhere.
fn peak_bytes(device: Device) -> Result<Option<u64>> {
    Ok(match device {
        Device::Cuda(i) => Some(crate::native::cuda_allocated_bytes(i)?.peak as u64),
        _ => peak_rss_mib().map(|mib| (mib * 1024.0 * 1024.0) as u64),
    })
}

/// VmHWM of this process from /proc (Linux); None elsewhere.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
