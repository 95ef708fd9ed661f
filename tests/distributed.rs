//! Data parallel on c10d: the binding's collectives between two Gloo ranks, and `clover train`
//! as two processes of the real binary (loopback rendezvous) against a single-process run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{clover_bin, free_port, max_abs_diff, repo_root, scratch_dir, tiny_samples};
use clover::data::shards::{write_samples, Split};
use clover::native::{GroupSpec, ProcessGroup};
use clover::training::checkpoint::{list_checkpoints, read_checkpoint_head};
use tch::{Kind, Tensor};

fn spec(port: u16, rank: usize, world: usize, backend: &str) -> GroupSpec<'_> {
    GroupSpec {
        backend,
        host: "127.0.0.1",
        port,
        agent_store: None,
        rank,
        world,
        timeout: Duration::from_secs(30),
    }
}

#[test]
fn two_gloo_ranks_all_reduce_broadcast_and_meet_at_a_barrier() {
    let port = free_port();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            std::thread::spawn(move || {
                let group = ProcessGroup::join(&spec(port, rank, 2, "gloo")).unwrap();
                let r = rank as f64;
                // Two dtypes and a 16-byte bucket limit: several buckets, one a lone tensor.
                let a = Tensor::full([5], r + 1.0, (Kind::Float, tch::Device::Cpu));
                let b = Tensor::arange(3, (Kind::Double, tch::Device::Cpu)) * (r + 1.0);
                let c = Tensor::full([2, 2], 10.0 * (r + 1.0), (Kind::Float, tch::Device::Cpu));
                group.all_reduce(&[&a, &b, &c], false, 16).unwrap();
                let d = Tensor::full([4], 2.0 * (r + 1.0), (Kind::Float, tch::Device::Cpu));
                group.all_reduce(&[&d], true, 1 << 20).unwrap();
                let e = Tensor::full([3], 7.0 + r, (Kind::Float, tch::Device::Cpu));
                group.broadcast(&[&e], 0, 1 << 20).unwrap();
                group.barrier().unwrap();
                (
                    Vec::<f32>::try_from(&a).unwrap(),
                    Vec::<f64>::try_from(&b).unwrap(),
                    Vec::<f32>::try_from(c.flatten(0, -1)).unwrap(),
                    Vec::<f32>::try_from(&d).unwrap(),
                    Vec::<f32>::try_from(&e).unwrap(),
                )
            })
        })
        .collect();
    for rank in ranks {
        // Small integers: sums and halves are exact in f32/f64.
        let (a, b, c, d, e) = rank.join().unwrap();
        assert_eq!(a, vec![3.0; 5], "sum of 1 and 2");
        assert_eq!(b, vec![0.0, 3.0, 6.0], "sum of arange·1 and arange·2");
        assert_eq!(c, vec![30.0; 4], "sum of 10 and 20");
        assert_eq!(d, vec![3.0; 4], "average of 2 and 4");
        assert_eq!(e, vec![7.0; 3], "rank 0's values");
    }
}

/// On a CUDA machine NCCL serves a one-rank group on cuda:0 (world size 1 runs the whole code
/// path: rendezvous, communicator, collectives); without CUDA it is refused, saying why.
#[test]
fn nccl_runs_one_rank_on_cuda_and_is_refused_clearly_without() {
    let joined = ProcessGroup::join(&spec(free_port(), 0, 1, "nccl"));
    if tch::Cuda::is_available() {
        let group = joined.unwrap();
        let cuda = tch::Device::Cuda(0);
        let a = Tensor::full([1000], 1.5, (Kind::Float, cuda));
        let b = Tensor::full([3], 2.0, (Kind::BFloat16, cuda));
        group.all_reduce(&[&a, &b], false, 1024).unwrap();
        group.broadcast(&[&a], 0, 1 << 20).unwrap();
        group.barrier().unwrap();
        // One rank: the sum is the tensor itself, exactly.
        assert_eq!(
            Vec::<f32>::try_from(&a.to_device(tch::Device::Cpu)).unwrap(),
            vec![1.5; 1000]
        );
        assert_eq!(
            b.to_kind(Kind::Float).sum(Kind::Float).double_value(&[]),
            6.0
        );
    } else {
        let msg = format!("{:#}", joined.err().unwrap());
        assert!(msg.contains("NCCL") && msg.contains("rank 0 of 1"), "{msg}");
    }
    let err = ProcessGroup::join(&spec(free_port(), 0, 1, "mpi"))
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("unknown backend 'mpi'"),
        "{err:#}"
    );
}

/// A training data dir (tiny fixture samples) and a config writing to `out`.
fn write_run(root: &Path, name: &str, max_steps: u64, extra: &str) -> PathBuf {
    let data = root.join("data");
    if !data.exists() {
        write_samples(&data, Split::Train, &tiny_samples(24, 31)).unwrap();
        write_samples(&data, Split::Eval, &tiny_samples(4, 32)).unwrap();
    }
    // schedule_steps is fixed so that runs of different lengths share the lr curve.
    let toml = format!(
        "model_dir = \"{}\"\ndata_dir = \"{}\"\nout_dir = \"{}\"\ndevice = \"cpu\"\n\
         num_depths = 3\nmax_steps = {max_steps}\nschedule_steps = 6\nbatch_tokens = 64\n\
         bucket_window = 8\nwarmup_steps = 2\neval_every = 3\nsave_every = 3\nkeep_last = 2\n\
         eval_samples = 4\nseed = 5\nprogress = false\n{extra}",
        repo_root()
            .join("tests/fixtures/tiny-llama-untied")
            .display(),
        data.display(),
        root.join(name).display(),
    );
    let config = root.join(format!("{name}.toml"));
    std::fs::write(&config, toml).unwrap();
    config
}

/// `clover train --config` as rank `rank` of `world` (rendezvous on `port`), output piped.
fn spawn_rank(config: &Path, rank: usize, world: usize, port: u16, resume: bool) -> Child {
    let mut cmd = Command::new(clover_bin());
    cmd.args(["train", "--config"]).arg(config);
    if resume {
        cmd.arg("--resume");
    }
    cmd.env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("CLOVER_DIST_TIMEOUT", "20")
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning clover")
}

/// Runs `clover train` as `world` ranks and returns each rank's (exit code, output).
fn run_ranks(config: &Path, world: usize, resume: bool) -> Vec<(i32, String)> {
    let port = free_port();
    let children: Vec<Child> = (0..world)
        .map(|rank| spawn_rank(config, rank, world, port, resume))
        .collect();
    children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.code().unwrap_or(-1), text)
        })
        .collect()
}

fn run_single(config: &Path, resume: bool) {
    let mut cmd = Command::new(clover_bin());
    cmd.args(["train", "--config"]).arg(config);
    if resume {
        cmd.arg("--resume");
    }
    let out = cmd.env("OMP_NUM_THREADS", "1").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn final_weights(out: &Path) -> std::collections::BTreeMap<String, Tensor> {
    let last = list_checkpoints(out).unwrap().pop().expect("a checkpoint");
    read_checkpoint_head(&last).unwrap().1
}

/// The largest difference between two checkpoints' weights, over all tensors.
fn weights_diff(a: &Path, b: &Path) -> f64 {
    let (wa, wb) = (final_weights(a), final_weights(b));
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    wa.iter()
        .map(|(n, t)| max_abs_diff(t, &wb[n]))
        .fold(0.0, f64::max)
}

fn fingerprints(outputs: &[(i32, String)]) -> Vec<String> {
    outputs
        .iter()
        .map(|(code, text)| {
            assert_eq!(*code, 0, "a rank failed:\n{text}");
            text.lines()
                .find_map(|l| l.split("weights fingerprint ").nth(1))
                .unwrap_or_else(|| panic!("no fingerprint in:\n{text}"))
                .to_string()
        })
        .collect()
}

#[test]
fn two_gloo_ranks_train_like_one_process_and_resume_exactly() {
    let root = scratch_dir("distributed", "train");
    let single = write_run(&root, "single", 6, "");
    run_single(&single, false);

    let two = write_run(&root, "two", 6, "");
    let outputs = run_ranks(&two, 2, false);
    let prints = fingerprints(&outputs);
    assert_eq!(prints[0], prints[1], "both ranks hold identical weights");
    // Same global batches, each rank half the rows with the whole batch's normaliser, gradients
    // summed: the same sums in another order, so each gradient differs by a few f32 round-offs
    // (2^-24 relative), and so does each AdamW update lr·m/(√v+eps) (lr ≤ 1e-3). Added to
    // weights of magnitude ≤ ~1 (the cells' identity init), an update can round the other way:
    // one ulp of 1, 2^-23 ≈ 1.2e-7, per step at most. 1e-6 allows 8 such ulps over the 6 steps;
    // a wrong normaliser (each rank's own rows) misses by ~4e-3.
    let diff = weights_diff(&root.join("single"), &root.join("two"));
    eprintln!("token batches, two ranks vs one process: max |Δw| = {diff:e}");
    assert!(
        diff <= 1e-6,
        "two ranks vs one process: max |Δw| = {diff:e}"
    );

    // Conversation batching: the step's micro-batches are dealt whole to the ranks, each with
    // its own normaliser as in one process; same bound.
    let conversations = "conversations_per_step = 8\nmicro_batch_tokens = 40\n";
    let single = write_run(&root, "single-conv", 6, conversations);
    run_single(&single, false);
    let two_conv = write_run(&root, "two-conv", 6, conversations);
    let prints = fingerprints(&run_ranks(&two_conv, 2, false));
    assert_eq!(prints[0], prints[1], "both ranks hold identical weights");
    let diff = weights_diff(&root.join("single-conv"), &root.join("two-conv"));
    eprintln!("conversation batches, two ranks vs one process: max |Δw| = {diff:e}");
    assert!(
        diff <= 1e-6,
        "two ranks vs one process: max |Δw| = {diff:e}"
    );

    // Three ranks: step 5's batch has one row, so two ranks have none (they add zeros); same
    // bound.
    let three = write_run(&root, "three", 6, "");
    let prints = fingerprints(&run_ranks(&three, 3, false));
    assert!(
        prints.iter().all(|p| *p == prints[0]),
        "all ranks hold identical weights"
    );
    let diff = weights_diff(&root.join("single"), &root.join("three"));
    eprintln!("token batches, three ranks vs one process: max |Δw| = {diff:e}");
    assert!(
        diff <= 1e-6,
        "three ranks vs one process: max |Δw| = {diff:e}"
    );

    // Offline, from a distillation cache that both ranks read: same bound.
    let cache = root.join("cache");
    let distilled = Command::new(clover_bin())
        .args(["distill", "--device", "cpu", "--data"])
        .arg(root.join("data"))
        .arg("--model")
        .arg(repo_root().join("tests/fixtures/tiny-llama-untied"))
        .arg("--out")
        .arg(&cache)
        .output()
        .unwrap();
    assert!(
        distilled.status.success(),
        "{}",
        String::from_utf8_lossy(&distilled.stderr)
    );
    let offline = format!("distill_cache = \"{}\"\n", cache.display());
    run_single(&write_run(&root, "single-offline", 6, &offline), false);
    let prints = fingerprints(&run_ranks(
        &write_run(&root, "two-offline", 6, &offline),
        2,
        false,
    ));
    assert_eq!(prints[0], prints[1], "both ranks hold identical weights");
    let diff = weights_diff(&root.join("single-offline"), &root.join("two-offline"));
    eprintln!("offline, two ranks vs one process: max |Δw| = {diff:e}");
    assert!(
        diff <= 1e-6,
        "two ranks vs one process: max |Δw| = {diff:e}"
    );

    let metrics = std::fs::read_to_string(root.join("two/metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().count(),
        6,
        "rank 0 alone writes the metrics"
    );
    assert!(root.join("two/eval.jsonl").exists(), "rank 0 evaluates");

    // Interrupted after step 3 and resumed under two ranks: the same as the uninterrupted run.
    let half = write_run(&root, "resumed", 3, "");
    fingerprints(&run_ranks(&half, 2, false));
    let full = write_run(&root, "resumed", 6, "");
    let resumed = run_ranks(&full, 2, true);
    fingerprints(&resumed);
    assert!(resumed[1].1.contains("resuming from"), "{}", resumed[1].1);
    // Same ranks, same ops on the same inputs with weights, moments and data order restored
    // exactly: bit-identical.
    let diff = weights_diff(&root.join("two"), &root.join("resumed"));
    assert_eq!(diff, 0.0, "resumed under two ranks vs uninterrupted");
}

/// Waits up to `limit` for `child` to exit; kills it and fails otherwise.
fn wait_within(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_rank_makes_the_other_fail_within_the_timeout_and_the_checkpoint_resumes() {
    let root = scratch_dir("distributed", "killed");
    // Long enough that rank 1 is killed mid-run.
    let config = write_run(&root, "run", 100_000, "");
    let port = free_port();
    let mut first = spawn_rank(&config, 0, 2, port, false);
    let mut second = spawn_rank(&config, 1, 2, port, false);
    let out = root.join("run");
    let start = Instant::now();
    while list_checkpoints(&out).map_or(true, |c| c.is_empty()) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint written"
        );
        for child in [&mut first, &mut second] {
            if let Some(status) = child.try_wait().unwrap() {
                let mut text = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut text).unwrap();
                panic!("a rank exited ({status}) before the first checkpoint:\n{text}");
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    second.kill().unwrap();
    second.wait().unwrap();
    let killed_at = Instant::now();
    // CLOVER_DIST_TIMEOUT is 20 s; a closed connection usually fails the next collective at once.
    let status = wait_within(&mut first, Duration::from_secs(60), "rank 0");
    assert!(!status.success(), "rank 0 must fail when rank 1 dies");
    let mut text = String::new();
    std::io::Read::read_to_string(first.stderr.as_mut().unwrap(), &mut text).unwrap();
    assert!(
        text.contains("rank 0 of 2") && text.contains("all-reduce"),
        "the error names the rank and the collective:\n{text}"
    );
    eprintln!(
        "rank 0 exited {:?} after the kill: {}",
        killed_at.elapsed(),
        text.lines().last().unwrap_or("")
    );

    // The newest checkpoint is whole and a run resumes from it (a single process here).
    let last = list_checkpoints(&out).unwrap().pop().unwrap();
    let step: u64 = last
        .to_string_lossy()
        .rsplit('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    read_checkpoint_head(&last).unwrap();
    let resume = write_run(&root, "run", step + 1, "");
    run_single(&resume, true);
    let after = list_checkpoints(&out).unwrap().pop().unwrap();
    assert!(
        after.ends_with(format!("step-{:08}", step + 1)),
        "{}",
        after.display()
    );
}

#[test]
fn distill_takes_its_shard_from_a_launch() {
    let root = scratch_dir("distributed", "distill");
    let data = root.join("data");
    write_samples(&data, Split::Train, &tiny_samples(6, 41)).unwrap();
    let out = root.join("cache");
    let distill = |launch: Option<(usize, usize)>| {
        let mut cmd = Command::new(clover_bin());
        cmd.args(["distill", "--device", "cpu", "--data"])
            .arg(&data)
            .arg("--model")
            .arg(repo_root().join("tests/fixtures/tiny-llama-untied"))
            .arg("--out")
            .arg(&out);
        if let Some((rank, world)) = launch {
            cmd.env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", "0")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", "1");
        }
        let done = cmd.output().unwrap();
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
    };
    // Six samples make one shard, k = 0: worker 0's. Rank 1 of 2 has nothing to do.
    distill(Some((1, 2)));
    assert!(
        out.join(".lock-1-of-2").exists(),
        "rank 1 ran as worker 1/2"
    );
    assert!(!out.join("shard-00000.safetensors").exists());
    distill(Some((0, 2)));
    assert!(
        out.join("shard-00000.safetensors").exists(),
        "worker 0/2 wrote it"
    );
}
