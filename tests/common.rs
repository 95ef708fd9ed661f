//! Paths and small helpers shared by the integration tests.
#![allow(dead_code)]

use clover::model::head::DraftHead;
use clover::model::head_config::HeadConfig;
use clover::model::teacher::Teacher;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The repository the fixtures are read from: `CLOVER_REPO_ROOT` when the test binary runs away
/// from where it was built (`scripts/gpu-check.sh` on a machine without a toolchain), else the
/// build's own checkout.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CLOVER_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The `clover` binary under test: `CLOVER_BIN`, else the one cargo built with these tests.
pub fn clover_bin() -> PathBuf {
    std::env::var_os("CLOVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_clover")))
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests").join("fixtures").join(name)
}

/// The chat fixture's model dir: SmolLM2's tokenizer.json and tokenizer_config.json, no weights.
pub fn fixture_model_dir() -> PathBuf {
    fixture("chat").join("tokenizer")
}

/// The device of the device-generic tests (`tests/device.rs` and the tests that call into it):
/// `CLOVER_TEST_DEVICE` = cpu | cuda | cuda:N, default cpu. A named device that is absent is an
/// error, not a silent fall-back to the CPU.
pub fn test_device() -> Device {
    let name = std::env::var("CLOVER_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let device = clover::model::device::parse_device(&name)
        .unwrap_or_else(|e| panic!("CLOVER_TEST_DEVICE={name}: {e:#}"));
    if let Device::Cuda(i) = device {
        assert!(
            tch::Cuda::is_available() && (i as i64) < tch::Cuda::device_count(),
            "CLOVER_TEST_DEVICE={name}, but this machine has no such CUDA device"
        );
    }
    device
}

/// `test_device()` spelled as the configs and the CLI take it.
pub fn test_device_name() -> String {
    match test_device() {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// The tiny untied fixture on `device` in `kind`.
pub fn tiny_teacher_on(device: Device, kind: Kind) -> Teacher {
    Teacher::load(&fixture("tiny-llama-untied"), device, kind).expect("tiny fixture loads")
}

/// A tiny LLaMA fixture (`tiny-llama-tied` or `tiny-llama-untied`) as a CPU teacher in `kind`.
pub fn fixture_teacher(name: &str, kind: Kind) -> Teacher {
    Teacher::load(&fixture(name), Device::Cpu, kind).expect("tiny fixture loads")
}

/// The tiny untied fixture (GQA, llama3 RoPE scaling) as a CPU teacher in `kind`.
pub fn tiny_teacher(kind: Kind) -> Teacher {
    fixture_teacher("tiny-llama-untied", kind)
}

/// A reference-init draft head with `depths` depths on `teacher`, seeded.
pub fn tiny_head(teacher: &Teacher, depths: i64, seed: i64) -> DraftHead {
    let mut cfg = HeadConfig::from_teacher(&teacher.config);
    cfg.options.num_depths = depths;
    DraftHead::new(teacher, cfg, seed).expect("tiny head builds")
}

/// The imported SmolLM2 teacher. `make setup` creates it; a test that needs it fails loudly
/// instead of skipping when it is absent.
pub fn smollm2_dir() -> PathBuf {
    let dir = std::env::var("CLOVER_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            repo_root()
                .join("checkpoints")
                .join("smollm2-135m-instruct")
        });
    assert!(
        dir.join("config.json").exists(),
        "{} is missing: run `make setup` to fetch and import the SmolLM2 teacher",
        dir.display()
    );
    dir
}

/// A scratch directory that lives as long as the guard: removed on drop when the test passed,
/// kept (and its path printed) when the test is panicking, for a look at what it left.
pub struct Scratch {
    path: PathBuf,
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept the failed test's scratch dir {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A fresh, empty scratch directory for one test, unique per test area, name and process. Keep
/// the guard alive for the whole test body: the directory goes when it is dropped.
pub fn scratch_dir(area: &str, name: &str) -> Scratch {
    let path = std::env::temp_dir().join(format!("clover-{area}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).unwrap();
    Scratch { path }
}

/// Named tensors of a safetensors file.
pub fn read_golden(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

pub fn max_abs(a: &Tensor) -> f64 {
    a.abs().max().double_value(&[])
}

/// Unit round-off of f32, 2^-24.
pub const F32_U: f64 = 1.0 / 16_777_216.0;

/// Unit round-off of bf16, 2^-8.
pub const BF16_U: f64 = 1.0 / 256.0;

/// How far a bf16 evaluation may land from the f32 one (or two bf16 evaluations through
/// different kernels from each other, with `runs` = 2). Products accumulate in f32, so what
/// counts is every value stored in bf16 on the path: each is rounded once, relative error 2^-8
/// of its magnitude, and blocks that normalize their input keep magnitudes of the order of the
/// compared `scale`, so the errors of the `roundings` on the path add (as `f32_paths_bound`).
pub fn bf16_path_bound(roundings: usize, runs: usize, scale: f64) -> f64 {
    (roundings * runs) as f64 * BF16_U * scale
}

/// Unit round-off of f64, 2^-53.
pub const F64_U: f64 = f64::EPSILON / 2.0;

/// How far apart two f32 evaluations of the same network may land when they get there through
/// different kernels (batch or chunk shapes, a KV cache, a tree mask, another library or CPU),
/// each free to order every reduction its own way. A k-term sum in any order is within
/// γ_k ≈ k·u of the exact one relative to Σ|terms|, so two orders differ by at most 2k·u of it.
/// Blocks that normalize their input (decoder layers, head steps, RMSNorm) keep activations, and
/// so Σ|terms|, of the order of the largest compared value `scale`, and the errors of successive
/// blocks add: `widths` holds the widest reduction of each block on the path.
pub fn f32_paths_bound(widths: &[i64], scale: f64) -> f64 {
    2.0 * F32_U * widths.iter().sum::<i64>() as f64 * scale
}

/// Runs the real `clover` binary (progress lines every 0.1 s, the shortest interval, so they
/// show in a short run); returns its exit code and stdout + stderr together.
pub fn run_clover<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (i32, String) {
    run_clover_env(args, &[("CLOVER_PROGRESS_SECS", "0.1")])
}

/// As `run_clover`, with the environment variables `env` set (and no progress interval unless
/// `env` names one).
pub fn run_clover_env<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    env: &[(&str, &str)],
) -> (i32, String) {
    let out = std::process::Command::new(clover_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running the clover binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A port that was free a moment ago (the OS picks it; c10d's TCPStore binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Six 8-token samples over the tiny fixtures' vocabulary (ids 3..93) as prepared data in `dir`:
/// all six in the train split, the first two also in the eval split.
pub fn write_tiny_prepared(dir: &Path) {
    use clover::data::shards::{write_samples, Sample, Split};
    let samples: Vec<Sample> = (0..6)
        .map(|i| Sample {
            id: format!("s{i}"),
            input_ids: (0..8).map(|t| ((i * 13 + t * 7) % 90 + 3) as i64).collect(),
            loss_mask: vec![1; 8],
        })
        .collect();
    write_samples(dir, Split::Train, &samples).unwrap();
    write_samples(dir, Split::Eval, &samples[..2]).unwrap();
}

/// Writes a one-step CPU training config at `path` for `model` on the prepared `data`, offline
/// from `cache` when given, writing into `out`.
pub fn write_tiny_train_toml(
    path: &Path,
    model: &Path,
    data: &Path,
    cache: Option<&Path>,
    out: &Path,
) {
    let cache = cache.map_or(String::new(), |c| {
        format!("distill_cache = \"{}\"\n", c.display())
    });
    std::fs::write(
        path,
        format!(
            "model_dir = \"{}\"\ndata_dir = \"{}\"\n{cache}out_dir = \"{}\"\n\
             device = \"cpu\"\nnum_depths = 2\nmax_steps = 1\nbatch_tokens = 64\nprogress = false\n",
            model.display(),
            data.display(),
            out.display()
        ),
    )
    .unwrap();
}

/// Token samples of 6-17 tokens over the tiny fixture's vocabulary, loss mask from token 3 on.
pub fn tiny_samples(n: usize, seed: u64) -> Vec<clover::data::shards::Sample> {
    let mut rng = clover::training::batches::SplitMix64::new(seed);
    (0..n)
        .map(|i| {
            let len = 6 + (rng.next_u64() % 12) as usize;
            let input_ids: Vec<i64> = (0..len).map(|_| (rng.next_u64() % 96) as i64).collect();
            let loss_mask: Vec<u8> = (0..len).map(|j| u8::from(j >= 3)).collect();
            clover::data::shards::Sample {
                id: format!("s{i}"),
                input_ids,
                loss_mask,
            }
        })
        .collect()
}

/// A 6-step online training config on the tiny fixture teacher, writing into `out`.
pub fn tiny_train_config(out: &std::path::Path) -> clover::training::config::TrainConfig {
    let text = format!(
        r#"
model_dir = "{}"
data_dir = "unused"
out_dir = "{}"
device = "cpu"
num_depths = 3
max_steps = 6
batch_tokens = 48
bucket_window = 8
warmup_steps = 2
eval_every = 3
save_every = 3
keep_last = 2
eval_samples = 4
seed = 5
progress = false
"#,
        repo_root()
            .join("tests/fixtures/tiny-llama-untied")
            .display(),
        out.display()
    );
    clover::training::config::TrainConfig::from_toml(&text, "tiny").unwrap()
}

/// The loss of a whole batch (no data-parallel share), as the trainer computes it.
pub fn whole_batch_loss(
    teacher: &Teacher,
    (u, mask): (&Tensor, &Tensor),
    outs: &[Tensor],
    lm_head: clover::training::loss::DepthLogits,
    weights: &clover::training::loss::LossWeights,
    chunk: usize,
    vocab: Option<&clover::model::draft_vocab::DraftVocab>,
) -> clover::training::loss::LossParts {
    clover::training::loss::BatchLoss {
        teacher,
        u,
        mask,
        outs,
        lm_head,
        weights,
        chunk,
        vocab,
        counts: None,
    }
    .compute()
    .expect("batch loss")
}

/// A random (reference-init, seed 3) Clover-2 head for the teacher at `model`, exported to
/// `out` as `clover export` writes one.
pub fn export_random_head(model: &Path, out: &Path) {
    let teacher = Teacher::load(model, Device::Cpu, Kind::Float).unwrap();
    let cfg = HeadConfig::from_teacher(&teacher.config);
    let head = DraftHead::new(&teacher, cfg.clone(), 3).unwrap();
    clover::training::export::export_head(
        &cfg,
        &head.named_tensors(),
        &model.join("config.json"),
        None,
        out,
    )
    .unwrap();
}

/// `n` held-out rows on `teacher`'s own path: a seeded prompt of `prompt_len` tokens (ids 3..93)
/// followed by the teacher's greedy answer of `answer_len` tokens (no stop token), loss mask 1
/// everywhere. Returns the prompts and the rows.
pub fn teacher_path_rows(
    teacher: &Teacher,
    n: usize,
    (prompt_len, answer_len): (usize, usize),
    seed: u64,
) -> (Vec<Vec<i64>>, Vec<clover::data::shards::Sample>) {
    let mut rng = clover::training::batches::SplitMix64::new(seed);
    let cfg = clover::decode::generate::GenerationConfig {
        max_new_tokens: answer_len,
        temperature: 0.0,
        seed: 0,
        stop_ids: vec![],
    };
    let mut prompts = Vec::new();
    let mut rows = Vec::new();
    for i in 0..n {
        let prompt: Vec<i64> = (0..prompt_len)
            .map(|_| (rng.next_u64() % 90 + 3) as i64)
            .collect();
        let answer = clover::decode::generate::generate(teacher, &prompt, &cfg)
            .expect("greedy answer")
            .answer
            .token_ids;
        let input_ids: Vec<i64> = prompt.iter().chain(&answer).copied().collect();
        rows.push(clover::data::shards::Sample {
            id: format!("path{i}"),
            loss_mask: vec![1; input_ids.len()],
            input_ids,
        });
        prompts.push(prompt);
    }
    (prompts, rows)
}
