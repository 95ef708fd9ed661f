//! `clover bench-train`: tokens/s and peak memory of the training step, as one JSON line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use tch::{Kind, Tensor};

use crate::data::shards::Sample;
use crate::model::device::RunOn;
use crate::model::head::DraftHead;
use crate::model::head_config::HeadConfig;
use crate::model::teacher::Teacher;
use crate::training::batches::{make_batch, SplitMix64};
use crate::training::loss::{batch_loss, LossWeights};
use crate::training::optimizer::{clip_grads_by_value, zero_grads, AdamW};

#[derive(Debug)]
pub struct BenchTrainOptions {
    /// Teacher model dir.
    pub model: PathBuf,
    pub run_on: RunOn,
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

/// Throughput of the full online training step (teacher forward, 5-depth head forward/backward,
/// AdamW) on random tokens, and the process's peak resident memory, as one JSON line.
pub fn run_bench(args: &BenchTrainOptions) -> Result<()> {
    let (device, kind) = args.run_on.resolve()?;
    let teacher = Teacher::load(&args.model, device, kind)?;
    let mut head_cfg = HeadConfig::from_teacher(&teacher.config);
    head_cfg.options.num_depths = args.num_depths;
    let mut head = DraftHead::new(&teacher, head_cfg, 0)?;
    if device.is_cuda() {
        head.set_compute_kind(Kind::BFloat16);
    }
    let params = head.named_tensors();
    let mut opt = AdamW::new(&params, (0.9, 0.95), 1e-8, 0.01);
    let weights = LossWeights::reference(head.config());
    let mut rng = SplitMix64::new(1);
    let vocab = teacher.config.vocab_size as u64;
    let samples: Vec<Sample> = (0..args.batch)
        .map(|i| Sample {
            id: format!("bench{i}"),
            input_ids: (0..args.seq_len)
                .map(|_| (rng.next_u64() % vocab) as i64)
                .collect(),
            loss_mask: vec![1; args.seq_len],
        })
        .collect();
    let refs: Vec<&Sample> = samples.iter().collect();
    let lm_head = |o: &Tensor| head.logits(o);
    let mut step = || -> Result<f64> {
        let batch = make_batch(&teacher, &refs, None, args.seq_len)?;
        let outs = head.depth_outputs(&batch.u, &batch.next_ids, None);
        let parts = batch_loss(
            &teacher,
            &batch.u,
            &batch.mask,
            &outs,
            &lm_head,
            &weights,
            args.loss_chunk,
        )?;
        zero_grads(&params);
        parts.total.backward();
        clip_grads_by_value(&params, 0.5);
        opt.update(&params, 1e-3);
        Ok(parts.depths.iter().map(|d| d.loss).sum())
    };
    step()?;
    if device.is_cuda() {
        tch::Cuda::synchronize(0);
    }
    let started = Instant::now();
    let mut last = 0.0;
    for _ in 0..args.steps {
        last = step()?;
    }
    if device.is_cuda() {
        tch::Cuda::synchronize(0);
    }
    let secs = started.elapsed().as_secs_f64();
    let tokens = (args.steps * args.batch * args.seq_len) as f64;
    let report = serde_json::json!({
        "model": args.model.display().to_string(),
        "device": format!("{device:?}"),
        "threads": tch::get_num_threads(),
        "trainable_parameters": head.num_parameters(),
        "num_depths": args.num_depths,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "loss_chunk": args.loss_chunk,
        "steps": args.steps,
        "seconds": secs,
        "tokens_per_s": tokens / secs,
        "peak_rss_mib": peak_rss_mib(),
        "last_loss": last,
    });
    println!("{report}");
    Ok(())
}

/// VmHWM of this process from /proc (Linux); None elsewhere.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
