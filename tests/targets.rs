use crate::common::{f32_paths_bound, fixture, fixture_teacher, max_abs};
use clover::data::shards::{write_samples, Sample, Split};
use clover::training::targets::{run, DistillCache, DistillOptions, SAMPLES_PER_SHARD};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// More samples than one shard holds, of varied lengths, with ids inside the tiny vocabulary.
fn prepared_data(dir: &Path) {
    let samples: Vec<Sample> = (0..SAMPLES_PER_SHARD + 20)
        .map(|i| {
            let len = 3 + (i * 7) % 13;
            Sample {
                id: format!("s{i}"),
                input_ids: (0..len)
                    .map(|t| ((i * 31 + t * 17) % 90 + 3) as i64)
                    .collect(),
                loss_mask: (0..len).map(|t| (t % 2) as u8).collect(),
            }
        })
        .collect();
    write_samples(dir, Split::Train, &samples).unwrap();
}

fn args(data: &Path, out: &Path, max_shards: Option<usize>) -> DistillOptions {
    DistillOptions {
        data: data.to_path_buf(),
        model: fixture("tiny-llama-tied"),
        out: out.to_path_buf(),
        run_on: clover::model::device::RunOn {
            device: clover::model::device::DeviceChoice::Cpu,
            dtype: clover::model::device::DtypeChoice::Bf16,
        },
        shard: "0/1".into(),
        batch_tokens: 64,
        max_shards,
    }
}

#[test]
fn stored_states_equal_a_fresh_teacher_forward_within_bf16_rounding() {
    let root = crate::common::scratch_dir("targets", "roundtrip");
    let (data, out) = (root.join("data"), root.join("cache"));
    prepared_data(&data);
    run(&args(&data, &out, None)).unwrap();
    let cache = DistillCache::open(&out).unwrap();
    assert_eq!(cache.len(), SAMPLES_PER_SHARD + 20);
    let teacher = fixture_teacher("tiny-llama-tied", Kind::Float);
    for i in [0, 7, SAMPLES_PER_SHARD + 3] {
        let (sample, stored) = cache.get(i).unwrap();
        let n = sample.input_ids.len() as i64;
        let ids = Tensor::from_slice(&sample.input_ids).unsqueeze(0);
        let pos = Tensor::arange(n, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let fresh = tch::no_grad(|| teacher.forward(&ids, &pos, None, None)).squeeze_dim(0);
        assert_eq!(stored.kind(), Kind::BFloat16);
        assert_eq!(stored.size(), fresh.size());
        // bf16 keeps 8 significant bits: relative error at most 2^-8 per element.
        let err = (stored.to_kind(Kind::Float) - &fresh).abs();
        // Plus the f32 gap of batched-and-padded vs single forwards (2 layers, MLP over 160),
        // absolute, as it is relative to the row's scale: 2·320·2^-24·max|u|.
        let paths = f32_paths_bound(&[160, 160], max_abs(&fresh));
        let bound = fresh.abs() * (1.0 / 256.0) + paths;
        assert!(
            err.le_tensor(&bound).all().int64_value(&[]) == 1,
            "sample {i} differs beyond bf16 rounding"
        );
    }
    let bytes: u64 = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let tokens: usize = cache.samples().iter().map(|s| s.input_ids.len()).sum();
    let per_token = bytes as f64 / tokens as f64;
    // 2·H bytes of state per token, plus the shard header and offsets.
    assert!(per_token < 2.0 * 64.0 * 1.1, "{per_token} bytes per token");
}

#[test]
fn interrupted_distill_resumes_to_the_same_cache() {
    let root = crate::common::scratch_dir("targets", "resume");
    let data = root.join("data");
    prepared_data(&data);
    let (whole, resumed) = (root.join("whole"), root.join("resumed"));
    run(&args(&data, &whole, None)).unwrap();
    run(&args(&data, &resumed, Some(1))).unwrap();
    assert!(
        DistillCache::open(&resumed).is_err(),
        "a half-done cache must not open"
    );
    run(&args(&data, &resumed, None)).unwrap();
    for k in 0..2 {
        let name = format!("shard-{k:05}.safetensors");
        assert_eq!(
            std::fs::read(whole.join(&name)).unwrap(),
            std::fs::read(resumed.join(&name)).unwrap(),
            "{name} differs after resume"
        );
    }
}

#[test]
fn workers_split_shards_and_together_make_the_whole_cache() {
    let root = crate::common::scratch_dir("targets", "workers");
    let data = root.join("data");
    prepared_data(&data);
    let out = root.join("cache");
    for worker in ["1/2", "0/2"] {
        run(&DistillOptions {
            shard: worker.into(),
            ..args(&data, &out, None)
        })
        .unwrap();
    }
    assert_eq!(
        DistillCache::open(&out).unwrap().len(),
        SAMPLES_PER_SHARD + 20
    );
    let err = run(&DistillOptions {
        shard: "2/2".into(),
        ..args(&data, &out, None)
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("--shard"), "{err:#}");
}
