//! `clover bench`: throughput figures written as JSON (never asserted in tests).
//!
//! Teacher prefill and decode tokens/s on the CPU, and on CUDA when present.

use crate::generate::{generate, GenerationConfig};
use crate::teacher::{parse_kind, Teacher};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Teacher model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Where to write the JSON report.
    #[arg(long)]
    pub out: PathBuf,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prefill_tokens: i64,
    /// Tokens decoded for the decode measurement.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Dtype on CUDA (the CPU always runs f32).
    #[arg(long, default_value = "bf16")]
    pub cuda_dtype: String,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let mut devices = vec![(Device::Cpu, Kind::Float)];
    if tch::Cuda::is_available() {
        devices.push((Device::Cuda(0), parse_kind(&args.cuda_dtype)?));
    }
    let mut reports = vec![];
    for (device, kind) in devices {
        let teacher = Teacher::load(&args.model, device, kind)?;
        let report = bench_teacher(&teacher, args)?;
        println!("{}", serde_json::to_string(&report)?);
        reports.push(report);
    }
    let out = json!({ "model": args.model, "teacher": reports });
    std::fs::write(&args.out, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("wrote {}", args.out.display());
    Ok(())
}

fn bench_teacher(teacher: &Teacher, args: &BenchArgs) -> Result<Value> {
    let device = teacher.device();
    let vocab = teacher.config.vocab_size;
    let n = args.prefill_tokens;
    let ids = Tensor::randint_low(10, vocab, [1, n], (Kind::Int64, device));
    let positions = Tensor::arange(n, (Kind::Int64, device)).unsqueeze(0);
    let prefill =
        || tch::no_grad(|| teacher.logits(&teacher.forward(&ids, &positions, None, None)));
    let _ = prefill(); // warm-up
    sync(device);
    let start = Instant::now();
    let reps = 3;
    for _ in 0..reps {
        let _ = prefill();
    }
    sync(device);
    let prefill_tps = (reps * n) as f64 / start.elapsed().as_secs_f64();
    let prompt: Vec<i64> = (0..32).map(|i| 100 + i).collect();
    let cfg = GenerationConfig {
        max_new_tokens: args.decode_tokens,
        temperature: 0.0,
        seed: 0,
        stop_ids: vec![],
    };
    generate(teacher, &prompt, &cfg)?; // warm-up
    let timed = generate(teacher, &prompt, &cfg)?;
    let decoded = timed.answer.token_ids.len().saturating_sub(1).max(1);
    Ok(json!({
        "device": format!("{device:?}"),
        "dtype": format!("{:?}", teacher.kind()),
        "threads": tch::get_num_threads(),
        "prefill_tokens": n,
        "prefill_tokens_per_s": prefill_tps,
        "decode_tokens": decoded,
        "decode_tokens_per_s": decoded as f64 / timed.decode_seconds,
    }))
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}
