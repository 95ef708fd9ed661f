//! `clover bench`: throughput figures written as JSON (never asserted in tests).
//!
//! Teacher prefill and decode tokens/s on the CPU, and on CUDA when present; with
//! `--conversations`, also the data stages: prepare tokens/s, distill tokens/s and the cache's
//! bytes per token.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::data::shards::{read_split, write_samples, Split};
use crate::decode::generate::{generate, GenerationConfig};
use crate::formats::chat::TemplateName;
use crate::model::device::{DeviceChoice, DtypeChoice, RunOn};
use crate::model::random::TeacherSource;
use crate::model::teacher::Teacher;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub teacher: TeacherSource,
    /// Where to write the JSON report.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    pub overwrite: bool,
    /// Prompt length for the prefill measurement.
    #[arg(long, value_parser = crate::checks::positive_i64, default_value_t = 512)]
    pub prefill_tokens: i64,
    /// Tokens decoded for the decode measurement.
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 64)]
    pub decode_tokens: usize,
    /// --device auto measures the CPU and, when present, CUDA device 0; cpu or cuda[:N] just that
    /// one. --dtype auto is f32 on the CPU and bf16 on CUDA.
    #[command(flatten)]
    pub run_on: RunOn,
    /// ShareGPT conversations for the data-stage figures (prepare and distill).
    #[arg(long)]
    pub conversations: Option<PathBuf>,
    /// Conversations distilled for the distill figure (prepare uses them all).
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 64)]
    pub distill_samples: usize,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let mut inputs = vec![];
    inputs.extend(args.teacher.model.as_deref().map(|m| ("--model", m)));
    inputs.extend(
        args.conversations
            .as_deref()
            .map(|c| ("--conversations", c)),
    );
    crate::outputs::refuse_overlap(("--out", &args.out), &inputs)?;
    crate::outputs::claim_file(&args.out, "--out", args.overwrite)?;
    let devices = match args.run_on.device {
        DeviceChoice::Auto if tch::Cuda::is_available() => vec![Device::Cpu, Device::Cuda(0)],
        DeviceChoice::Auto => vec![Device::Cpu],
        choice => vec![choice.resolve()?],
    };
    let mut reports = vec![];
    for device in devices {
        let kind = args.run_on.dtype.kind_on(device);
        let teacher = args.teacher.load(device, kind)?;
        let report = bench_teacher(&teacher, args)?;
        println!("{}", serde_json::to_string(&report)?);
        reports.push(report);
    }
    let data = match (&args.conversations, &args.teacher.model) {
        (Some(conversations), Some(model)) => bench_data(args, model, conversations)?,
        (Some(_), None) => bail!("--conversations needs --model (a tokenizer for prepare)"),
        (None, _) => Value::Null,
    };
    let out = json!({ "model": args.teacher.describe(), "teacher": reports, "data": data });
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
        "device": crate::model::device::device_name(device),
        "dtype": format!("{:?}", teacher.kind()),
        "threads": tch::get_num_threads(),
        "prefill_tokens": n,
        "prefill_tokens_per_s": prefill_tps,
        "decode_tokens": decoded,
        "decode_tokens_per_s": decoded as f64 / timed.decode_seconds,
    }))
}

/// Prepare all `conversations`, then distill the first `distill_samples` train samples on the
/// best device, in a scratch directory that is removed afterwards.
fn bench_data(args: &BenchArgs, model: &Path, conversations: &Path) -> Result<Value> {
    use crate::data::prepare::{prepare, PrepareOptions};
    let scratch = std::env::temp_dir().join(format!("clover-bench-{}", std::process::id()));
    let prepared = scratch.join("prepared");
    let start = Instant::now();
    let summary = prepare(&PrepareOptions {
        input: conversations.to_path_buf(),
        model: model.to_path_buf(),
        template: TemplateName::Auto,
        no_system_prompt: false,
        out: prepared.clone(),
        max_len: 2048,
        eval_fraction: 0.0,
        seed: 0,
        held_out: None,
    })?;
    let prepare_seconds = start.elapsed().as_secs_f64();
    let mut samples = read_split(&prepared, Split::Train)?;
    samples.truncate(args.distill_samples);
    let subset = scratch.join("subset");
    write_samples(&subset, Split::Train, &samples)?;
    let cache = scratch.join("cache");
    let device = if tch::Cuda::is_available() {
        DeviceChoice::Cuda(0)
    } else {
        DeviceChoice::Cpu
    };
    let start = Instant::now();
    crate::training::targets::run(&crate::training::targets::DistillOptions {
        data: subset,
        model: model.to_path_buf(),
        out: cache.clone(),
        run_on: RunOn {
            device,
            dtype: DtypeChoice::Bf16,
        },
        shard: "0/1".into(),
        batch_tokens: 8192,
        max_shards: None,
    })?;
    let distill_seconds = start.elapsed().as_secs_f64();
    let distilled: usize = samples.iter().map(|s| s.input_ids.len()).sum();
    let cache_bytes: u64 = std::fs::read_dir(&cache)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    std::fs::remove_dir_all(&scratch).ok();
    Ok(json!({
        "conversations": conversations,
        "prepare_tokens": summary.tokens,
        "prepare_tokens_per_s": summary.tokens as f64 / prepare_seconds,
        "distill_device": if device == DeviceChoice::Cpu { "cpu" } else { "cuda" },
        "distill_tokens": distilled,
        "distill_tokens_per_s": distilled as f64 / distill_seconds,
        "cache_bytes_per_token": cache_bytes as f64 / distilled as f64,
    }))
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}
