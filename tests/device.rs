//! Device- and dtype-generic checks. They run on `CLOVER_TEST_DEVICE` (cpu | cuda | cuda:N,
//! default cpu) in bf16, the dtype of the GPU path, against the CPU f32 result where there is
//! one. On the CPU, where `make test` always runs them, they are the bf16 variants of the
//! numerics (teacher, KV cache, autocast head, loss, resume, speculative decoding, sampling), so
//! every dtype branch runs on every machine; `scripts/gpu-check.sh` runs them on CUDA.
//!
//! Tolerances: `bf16_path_bound` (tests/common.rs) with the bf16 roundings counted on each path
//! below. Two evaluations in f32 differ by far less, so they do not enter.

use crate::common::{
    bf16_path_bound, fixture, max_abs, max_abs_diff, read_golden, test_device, test_device_name,
    tiny_head, tiny_samples, tiny_teacher, tiny_teacher_on, tiny_train_config,
};
use clover::decode::sampling::Sampling;
use clover::decode::speculative::generate_speculative;
use clover::decode::tree::Tree;
use clover::model::head::DraftHead;
use clover::model::head_config::HeadConfig;
use clover::model::teacher::Teacher;
use clover::training::checkpoint::read_checkpoint_head;
use clover::training::config::TrainOptions;
use clover::training::run_dir::Start;
use clover::training::trainer::{train, Source};
use tch::{Device, Kind, Tensor};

const BF16: Kind = Kind::BFloat16;

/// Values stored in bf16 per decoder layer of a bf16 teacher: RMSNorm output, q, k, v, the
/// attention output, o_proj's output, the residual sum, RMSNorm output, gate, up, silu·up,
/// down's output and the residual sum (13), plus its 7 weight matrices, each rounded once (7).
const LAYER_ROUNDINGS: usize = 13 + 7;
/// The tiny fixtures: two layers, then the final norm, the lm_head weight and the logits.
const PRENORM_ROUNDINGS: usize = 2 * LAYER_ROUNDINGS;
const LOGITS_ROUNDINGS: usize = PRENORM_ROUNDINGS + 3;

/// The draft head under bf16 autocast rounds the inputs, weight and output of every matrix
/// product (3 each) and nothing else. Depth 0: the cell's q, k, v (9); per Augmenting-Block layer
/// 7 products (21) plus attention's q, k, v and output (4); FC0 (3). Each further depth: the
/// cell (9) and the regressive FC (3).
fn head_roundings(depth: usize, layers: usize) -> usize {
    9 + layers * 25 + 3 + depth * 12
}

fn positions(start: i64, n: i64, device: Device) -> Tensor {
    Tensor::arange_start(start, start + n, (Kind::Int64, device)).unsqueeze(0)
}

fn to_cpu_f32(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu).to_kind(Kind::Float)
}

#[test]
fn bf16_teacher_on_the_test_device_matches_cpu_f32() {
    let device = test_device();
    let golden = read_golden(&fixture("tiny-llama-untied").join("golden.safetensors"));
    let ids = &golden["input_ids"];
    let n = ids.size()[1];
    let reference = tiny_teacher(Kind::Float);
    let want = tch::no_grad(|| {
        reference.logits(&reference.forward(ids, &positions(0, n, Device::Cpu), None, None))
    });
    let teacher = tiny_teacher_on(device, BF16);
    let got = tch::no_grad(|| {
        let u = teacher.forward(&ids.to_device(device), &positions(0, n, device), None, None);
        teacher.logits(&u)
    });
    assert_eq!(got.kind(), BF16);
    let (d, tol) = (
        max_abs_diff(&to_cpu_f32(&got), &want),
        bf16_path_bound(LOGITS_ROUNDINGS, 1, max_abs(&want)),
    );
    assert!(
        d <= tol,
        "bf16 logits on {device:?} differ from f32 by {d} (tol {tol})"
    );
}

/// Prefill, a block after a prefix, then single tokens through the KV cache, against one pass:
/// the same bf16 weights, so only the stored activations round differently (twice 13 per layer).
#[test]
fn bf16_kv_cache_on_the_test_device_equals_full_recomputation() {
    let device = test_device();
    let golden = read_golden(&fixture("tiny-llama-untied").join("golden.safetensors"));
    let ids = golden["input_ids"].to_device(device);
    let n = ids.size()[1];
    let teacher = tiny_teacher_on(device, BF16);
    let full = tch::no_grad(|| teacher.forward(&ids, &positions(0, n, device), None, None));
    let mut cache = teacher.new_cache(1);
    let mut chunks = vec![(0, 5), (5, 3)];
    chunks.extend((8..n).map(|i| (i, 1)));
    let parts: Vec<Tensor> = chunks
        .into_iter()
        .map(|(start, len)| {
            let chunk = ids.narrow(1, start, len);
            let pos = positions(start, len, device);
            tch::no_grad(|| teacher.forward(&chunk, &pos, None, Some(&mut cache)))
        })
        .collect();
    let incremental = to_cpu_f32(&Tensor::cat(&parts, 1));
    let full = to_cpu_f32(&full);
    let tol = bf16_path_bound(2 * 13, 2, max_abs(&full));
    let d = max_abs_diff(&incremental, &full);
    assert!(d <= tol, "cached bf16 decoding differs by {d} (tol {tol})");
}

/// The head under bf16 autocast on the test device against the f32 head on the CPU: the residual
/// stream and outputs stay f32, the values agree within the bf16 roundings of the matrix
/// products, and the gradients land on the f32 master weights, finite and close.
#[test]
fn autocast_head_on_the_test_device_matches_cpu_f32_forward_and_backward() {
    let device = test_device();
    let cpu_teacher = tiny_teacher(Kind::Float);
    let teacher = tiny_teacher_on(device, Kind::Float);
    let depths = 3;
    let cpu_head = tiny_head(&cpu_teacher, depths, 7);
    let mut head = tiny_head(&teacher, depths, 7);
    head.set_compute_kind(BF16);
    let (b, t) = (2i64, 9i64);
    let (ids, next, weights) = {
        let _rng = clover::rng::hold(3);
        (
            Tensor::randint(96, [b, t], (Kind::Int64, Device::Cpu)),
            Tensor::randint(96, [b, t], (Kind::Int64, Device::Cpu)),
            Tensor::randn([b, t, 64], (Kind::Float, Device::Cpu)),
        )
    };
    let u = tch::no_grad(|| {
        cpu_teacher.forward(
            &ids,
            &Tensor::arange(t, (Kind::Int64, Device::Cpu))
                .unsqueeze(0)
                .expand([b, t], true),
            None,
            None,
        )
    });
    let want = cpu_head.depth_outputs(&u, &next);
    let got = head.depth_outputs(&u.to_device(device), &next.to_device(device));
    let layers = head.config().options.num_layers as usize;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.kind(),
            Kind::Float,
            "depth {i}: the autocast stream must stay f32"
        );
        let tol = bf16_path_bound(head_roundings(i, layers), 1, max_abs(w));
        let d = max_abs_diff(&to_cpu_f32(g), w);
        assert!(d <= tol, "depth {i} output differs by {d} (tol {tol})");
    }
    // A fixed random projection of every depth's output as the scalar to differentiate.
    let scalar = |outs: &[Tensor], dev: Device| -> Tensor {
        outs.iter()
            .map(|o| {
                let rows = o.size()[1];
                (o * weights.narrow(1, 0, rows).to_device(dev)).sum(Kind::Float)
            })
            .fold(Tensor::zeros([], (Kind::Float, dev)), |a, x| a + x)
    };
    let grads = |h: &DraftHead, outs: &[Tensor], dev: Device| {
        let params = h.named_tensors();
        let inputs: Vec<&Tensor> = params.values().collect();
        let g = Tensor::run_backward(&[&scalar(outs, dev)], &inputs, false, false);
        params.keys().cloned().zip(g).collect::<Vec<_>>()
    };
    let want_g = grads(&cpu_head, &want, Device::Cpu);
    let got_g = grads(&head, &got, device);
    // Backward retraces every forward product with two more (input and weight gradients).
    let roundings = 3 * head_roundings(depths as usize - 1, layers);
    for ((name, g), (_, w)) in got_g.iter().zip(&want_g) {
        assert_eq!(
            g.kind(),
            Kind::Float,
            "{name}: gradient must reach the f32 master weight"
        );
        assert_eq!(g.device(), device);
        let g = to_cpu_f32(g);
        assert!(
            g.isfinite().all().int64_value(&[]) == 1,
            "{name}: non-finite gradient"
        );
        let tol = bf16_path_bound(roundings, 1, max_abs(w));
        let d = max_abs_diff(&g, w);
        assert!(
            d <= tol,
            "{name}: gradient differs by {d} (tol {tol}, max |g| {})",
            max_abs(w)
        );
    }
}

#[test]
fn chunked_loss_on_the_test_device_matches_unchunked_in_bf16() {
    crate::loss::chunked_matches_unchunked_in_bf16_on(test_device());
}

/// Training on the test device with a bf16 teacher and bf16 autocast (`bf16_on_cpu` makes the
/// CPU take the GPU's branch): a run halted and resumed equals the uninterrupted run. Same ops
/// on the same inputs, so on the CPU the figures are bit-identical (1e-6 asks for that on losses
/// of about 25); on CUDA, atomics may order a sum differently between runs, and one bf16
/// rounding flipped on the path moves the loss by at most the head's bf16 bound.
#[test]
fn bf16_training_on_the_test_device_resumes_exactly() {
    let device = test_device();
    let teacher = tiny_teacher_on(device, BF16);
    let (train_set, eval_set) = (tiny_samples(16, 1), tiny_samples(4, 2));
    let config = |name: &str| {
        let dir = crate::common::scratch_dir("device", name);
        let mut cfg = tiny_train_config(&dir);
        cfg.device = test_device_name();
        cfg.bf16_on_cpu = true;
        (cfg, dir)
    };
    let (cfg_a, _dir_a) = config("resume-a");
    let run = |cfg, resume, halt| {
        let opts = TrainOptions {
            halt_after_step: halt,
            ..Default::default()
        };
        train(
            cfg,
            &teacher,
            Source::Online(train_set.clone()),
            eval_set.clone(),
            resume,
            &opts,
            None,
        )
        .unwrap()
    };
    let full = run(&cfg_a, Start::Fresh, None);
    let (cfg_b, _dir_b) = config("resume-b");
    let first = run(&cfg_b, Start::Fresh, Some(3));
    let rest = run(&cfg_b, Start::Resume, None);
    let layers = cfg_a.head.num_layers as usize;
    let rel = if device == Device::Cpu {
        1e-6 / 25.0
    } else {
        bf16_path_bound(head_roundings(2, layers), 1, 1.0)
    };
    for (a, b) in full.steps.iter().zip(first.steps.iter().chain(&rest.steps)) {
        assert!(a.loss.is_finite());
        assert!(
            (a.loss - b.loss).abs() <= rel * a.loss.abs(),
            "step {}: {} vs {} after resume",
            a.step,
            a.loss,
            b.loss
        );
    }
    let (_, wa) = read_checkpoint_head(full.last_checkpoint.as_ref().unwrap()).unwrap();
    let (_, wb) = read_checkpoint_head(rest.last_checkpoint.as_ref().unwrap()).unwrap();
    for (n, t) in &wa {
        assert_eq!(t.kind(), Kind::Float, "{n}: master weights stay f32");
        let tol = rel * max_abs(t).max(1e-6) * 25.0;
        assert!(max_abs_diff(t, &wb[n]) <= tol, "{n} differs after resume");
    }
}

/// The first answer position where the teacher's top-2 logits are closer than twice what two
/// bf16 kernel paths are seen to disagree by on this very sequence (one pass, against prefill plus
/// one token at a time through the cache, as plain decoding runs): there argmax may flip between
/// tree verification and plain decoding. Before it, the two must agree token for token. A
/// worst-case bound (`bf16_path_bound`) would call nearly every position a tie at this size.
fn first_near_tie(teacher: &Teacher, prompt: &[i64], answer: &[i64]) -> usize {
    let device = teacher.device();
    let seq: Vec<i64> = prompt.iter().chain(answer).copied().collect();
    let ids = Tensor::from_slice(&seq).unsqueeze(0).to_device(device);
    let n = seq.len() as i64;
    let one_pass = tch::no_grad(|| {
        teacher.logits(&teacher.forward(&ids, &positions(0, n, device), None, None))
    });
    let mut cache = teacher.new_cache(1);
    let p = prompt.len() as i64;
    let mut steps = vec![(0, p)];
    steps.extend((p..n).map(|i| (i, 1)));
    let cached: Vec<Tensor> = steps
        .into_iter()
        .map(|(start, len)| {
            let chunk = ids.narrow(1, start, len);
            let pos = positions(start, len, device);
            tch::no_grad(|| teacher.logits(&teacher.forward(&chunk, &pos, None, Some(&mut cache))))
        })
        .collect();
    let one_pass = to_cpu_f32(&one_pass.squeeze_dim(0));
    let cached = to_cpu_f32(&Tensor::cat(&cached, 1).squeeze_dim(0));
    let gap = 2.0 * max_abs_diff(&one_pass, &cached);
    let margin = |logits: &Tensor| {
        let (top, _) = logits.topk(2, -1, true, true);
        Vec::<f32>::try_from(top.select(1, 0) - top.select(1, 1)).unwrap()
    };
    let (a, b) = (margin(&one_pass), margin(&cached));
    (0..answer.len())
        .find(|&k| {
            let row = prompt.len() - 1 + k;
            f64::from(a[row].min(b[row])) <= gap
        })
        .unwrap_or(answer.len())
}

#[test]
fn bf16_greedy_speculative_on_the_test_device_equals_plain() {
    let device = test_device();
    let dir = crate::speculative::tiny_llama("device-greedy", 96, 4.0, 31);
    let teacher = Teacher::load(&dir, device, BF16).unwrap();
    let mut head = DraftHead::new(&teacher, HeadConfig::from_teacher(&teacher.config), 5).unwrap();
    head.to_kind(BF16);
    let tree = Tree::default_tree();
    let mut checked = 0;
    // bf16 logits near 10 are spaced 1/16 apart, so near-ties are frequent: many short prompts.
    let prompts: Vec<Vec<i64>> = (0..12i64)
        .map(|i| vec![2 + (i * 7) % 90, 3 + (i * 13) % 90, 5 + i])
        .collect();
    for prompt in prompts {
        let plain = crate::speculative::plain_greedy(&teacher, &prompt, 40, &[]);
        let (spec, _) =
            generate_speculative(&teacher, &head, &tree, &prompt, 40, Sampling::greedy(), &[])
                .unwrap();
        let agree = first_near_tie(&teacher, &prompt, &plain);
        assert_eq!(
            spec.answer.token_ids[..agree.min(spec.answer.token_ids.len())],
            plain[..agree],
            "prompt {prompt:?}: speculative and plain greedy part before any near-tie"
        );
        checked += agree;
    }
    eprintln!("{checked} tokens checked before near-ties");
    assert!(
        checked >= 30,
        "only {checked} tokens were free of near-ties: too weak a test"
    );
}

#[test]
fn tree_sampling_on_the_test_device_is_lossless() {
    crate::speculative::tree_sampling_is_lossless_on(test_device());
}

/// The bf16 pipeline through the real binary on the test device with the real SmolLM2 teacher:
/// distill into a bf16 cache, two offline training steps under bf16 autocast (`bf16_on_cpu`, so
/// the CPU takes the GPU's branch, teacher in bf16), export, and `clover eval --dtype bf16`. Every
/// stage must succeed and report finite figures; token-for-token equality in bf16 is the business
/// of `bf16_greedy_speculative_on_the_test_device_equals_plain` (it holds up to near-ties only).
#[test]
fn bf16_distill_train_eval_pipeline_on_the_test_device() {
    let model = crate::common::smollm2_dir();
    let root = crate::common::scratch_dir("device", "bf16-pipeline");
    let data = root.join("data");
    let samples = |n: usize, seed: u64| -> Vec<clover::data::shards::Sample> {
        let mut rng = clover::training::batches::SplitMix64::new(seed);
        (0..n)
            .map(|i| {
                let ids: Vec<i64> = (0..24).map(|_| (rng.next_u64() % 49_000) as i64).collect();
                clover::data::shards::Sample {
                    id: format!("s{i}"),
                    loss_mask: (0..24).map(|j| u8::from(j >= 6)).collect(),
                    input_ids: ids,
                }
            })
            .collect()
    };
    use clover::data::shards::{write_samples, Split};
    write_samples(&data, Split::Train, &samples(4, 1)).unwrap();
    write_samples(&data, Split::Eval, &samples(2, 2)).unwrap();
    let device = test_device_name();
    let (model_s, data_s) = (model.display().to_string(), data.display().to_string());
    let cache = root.join("cache").display().to_string();
    let (code, out) = crate::common::run_clover(&[
        "distill", "--data", &data_s, "--model", &model_s, "--out", &cache, "--device", &device,
        "--dtype", "bf16",
    ]);
    assert_eq!(code, 0, "distill: {out}");
    let train_dir = root.join("train");
    let config = root.join("train.toml");
    std::fs::write(
        &config,
        format!(
            "model_dir = \"{model_s}\"\ndata_dir = \"{data_s}\"\ndistill_cache = \"{cache}\"\n\
             out_dir = \"{}\"\ndevice = \"{device}\"\nmax_steps = 2\nbatch_tokens = 48\n\
             max_len = 24\nwarmup_steps = 1\neval_every = 2\nsave_every = 2\neval_samples = 2\n\
             bf16_on_cpu = true\nprogress = false\n",
            train_dir.display()
        ),
    )
    .unwrap();
    let (code, out) =
        crate::common::run_clover(&["train", "--config", &config.display().to_string()]);
    assert_eq!(code, 0, "train: {out}");
    let metrics = std::fs::read_to_string(train_dir.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 2);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    let head = root.join("head").display().to_string();
    let (code, out) = crate::common::run_clover(&[
        "export",
        "--checkpoint",
        &train_dir.display().to_string(),
        "--out",
        &head,
    ]);
    assert_eq!(code, 0, "export: {out}");
    let prompts = root.join("q.jsonl");
    std::fs::write(
        &prompts,
        r#"{"question_id": 1, "category": "writing", "turns": ["Say something about the sea."]}"#,
    )
    .unwrap();
    let report = root.join("eval.json");
    let (code, out) = crate::common::run_clover(&[
        "eval",
        "--model",
        &model_s,
        "--draft",
        &head,
        "--prompts",
        &prompts.display().to_string(),
        "--device",
        &device,
        "--dtype",
        "bf16",
        "--max-new-tokens",
        "8",
        "--report",
        &report.display().to_string(),
    ]);
    assert_eq!(code, 0, "eval: {out}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["dtype"], "BFloat16", "{json}");
    assert!(json["tau"].as_f64().unwrap() >= 1.0);
    assert!(json["tokens_per_s"].as_f64().unwrap() > 0.0);
}

/// `clover doctor --json` is one object with the keys scripts/doctor-device.sh parses, devices
/// named as `--device` names them.
#[test]
fn doctor_json_reports_cuda_devices_and_torch_version() {
    let (code, text) = crate::common::run_clover(&["doctor", "--json"]);
    assert_eq!(code, 0, "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    let found: serde_json::Value = serde_json::from_str(line).unwrap();
    let cuda = found["cuda_available"]
        .as_bool()
        .expect("cuda_available is a bool");
    let devices = found["devices"].as_array().unwrap();
    assert_eq!(devices[0], "cpu");
    assert_eq!(devices.len() > 1, cuda, "{found}");
    assert!(
        found["torch_version"].as_str().unwrap().starts_with('2'),
        "{found}"
    );
}
