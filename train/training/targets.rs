//! Distillation targets: the frozen teacher's states over prepared data, cached on disk.
//!
//! The reference stores two 16-bit copies of the hidden state per token (pre-norm u and post-norm
//! h, 16 KiB per token at H = 4096). We store only u in 16-bit: h = final_norm(u) and the teacher
//! distribution softmax(lm_head(h)) are recomputed from it in the trainer, exactly as the
//! reference computes the distribution from h. That is 2·H bytes per token; token ids and loss
//! masks stay in the prepared parquet and are not duplicated.
//!
//! Layout: `<out>/shard-XXXXX.safetensors`, one per block of `SAMPLES_PER_SHARD` samples of the
//! prepared train split (in order), each holding `prenorm` [tokens, H] and `offsets` [n+1], with
//! the sample ids in the safetensors metadata. Shards are written to a temporary name and renamed,
//! so an interrupted run leaves only whole shards and a rerun continues with the missing ones.
//! `--shard i/N` makes this worker do shards k with k % N == i, so many GPUs or machines can
//! split one dataset under any scheduler.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use tch::{Device, Kind, Tensor};

use crate::data::jobfiles::{atomic_write, pin_inputs, DirLock};
use crate::data::shards::{read_split, Sample, Split};
use crate::model::device::{DtypeChoice, RunOn};
use crate::model::teacher::Teacher;
use crate::progress::Progress;

pub const SAMPLES_PER_SHARD: usize = 256;
const MANIFEST: &str = "distill.json";

/// Whether `name` is a file distill writes (recognises its outputs from before markers).
pub fn is_output_file(name: &str) -> bool {
    name == MANIFEST
        || name.starts_with(".lock-")
        || (name.starts_with("shard-") && name.ends_with(".safetensors"))
}

#[derive(Debug)]
pub struct DistillOptions {
    /// Prepared data directory (output of `clover data prepare`).
    pub data: PathBuf,
    /// Teacher model directory.
    pub model: PathBuf,
    /// Output cache directory.
    pub out: PathBuf,
    /// Device, and the stored states' dtype: bf16 (auto) or f16; the teacher computes in that
    /// dtype on CUDA and in f32 on the CPU (where 16-bit matmuls are slow).
    pub run_on: RunOn,
    /// Which part of the shards this worker computes, as i/N.
    pub shard: String,
    /// Tokens per teacher forward pass (samples are batched by length up to this budget).
    pub batch_tokens: usize,
    /// Stop after writing this many shards in this run (the rest is left for a rerun).
    pub max_shards: Option<usize>,
}

/// What a cache holds, written once by the first worker and checked by every later one.
#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Manifest {
    data: PathBuf,
    model: PathBuf,
    dtype: String,
    hidden_size: i64,
    samples: usize,
    shards: usize,
    samples_per_shard: usize,
}

pub fn run(args: &DistillOptions) -> Result<()> {
    let (worker, workers) = crate::distributed::parse_shard(&args.shard)?;
    let kind = match args.run_on.dtype {
        DtypeChoice::Auto | DtypeChoice::Bf16 => Kind::BFloat16,
        DtypeChoice::F16 => Kind::Half,
        DtypeChoice::F32 => bail!("--dtype must be bf16 or f16: the cache stores 16-bit states"),
    };
    let device = args.run_on.device.resolve()?;
    // On CPU, 16-bit matmuls are slow or unsupported: compute in f32 and store 16-bit.
    let compute = if device == Device::Cpu {
        Kind::Float
    } else {
        kind
    };
    let teacher = Teacher::load(&args.model, device, compute)?;
    let samples = read_split(&args.data, Split::Train)?;
    check_train_split(&teacher, &samples, &args.data)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    // Absolute paths: training may run from any directory (a relative one recorded here would
    // name another place there, or nothing).
    let absolute = |p: &Path| {
        p.canonicalize()
            .with_context(|| format!("resolving {}", p.display()))
    };
    let manifest = Manifest {
        data: absolute(&args.data)?,
        model: absolute(&args.model)?,
        dtype: if kind == Kind::Half { "f16" } else { "bf16" }.to_string(),
        hidden_size: teacher.config.hidden_size,
        samples: samples.len(),
        shards: samples.len().div_ceil(SAMPLES_PER_SHARD),
        samples_per_shard: SAMPLES_PER_SHARD,
    };
    let _lock = DirLock::acquire(&args.out, &format!("{worker}-of-{workers}"))?;
    pin_inputs(&args.out.join(MANIFEST), &manifest)?;
    let todo: Vec<usize> = (0..manifest.shards)
        .filter(|k| k % workers == worker && !shard_path(&args.out, *k).exists())
        .take(args.max_shards.unwrap_or(usize::MAX))
        .collect();
    let mut bar = Progress::new("distill (shards)", todo.len() as u64);
    let started = std::time::Instant::now();
    let mut tokens = 0usize;
    for k in todo {
        let block =
            &samples[k * SAMPLES_PER_SHARD..((k + 1) * SAMPLES_PER_SHARD).min(samples.len())];
        let states = teacher_states(&teacher, block, args.batch_tokens)?;
        write_shard(&args.out, k, block, &states, kind)?;
        tokens += block.iter().map(|s| s.input_ids.len()).sum::<usize>();
        bar.set_message(format!(
            "{:.0} tok/s",
            tokens as f64 / started.elapsed().as_secs_f64()
        ));
        bar.inc(1);
    }
    bar.finish();
    println!(
        "distilled {tokens} tokens in {:.1}s into {} ({} bytes per token)",
        started.elapsed().as_secs_f64(),
        args.out.display(),
        2 * teacher.config.hidden_size
    );
    Ok(())
}

/// Refuses, before any work, a train split the teacher cannot run: empty, a token id outside
/// its vocabulary, or a sample past its context.
fn check_train_split(teacher: &Teacher, samples: &[Sample], data: &Path) -> Result<()> {
    ensure!(
        !samples.is_empty(),
        "{}: the train split is empty",
        data.display()
    );
    let context = teacher.config.max_position_embeddings as usize;
    for s in samples {
        teacher
            .check_token_ids(&s.input_ids)
            .with_context(|| format!("{}: train sample {:?}", data.display(), s.id))?;
        ensure!(
            s.input_ids.len() <= context,
            "{}: train sample {:?} has {} tokens, more than the teacher's context of {context} \
             positions: prepare the data again with --max-len {context} or less",
            data.display(),
            s.id,
            s.input_ids.len()
        );
    }
    Ok(())
}

fn shard_path(out: &Path, k: usize) -> PathBuf {
    out.join(format!("shard-{k:05}.safetensors"))
}

/// Pre-norm states of each sample ([T,H] on the CPU), computed in length-sorted batches of at
/// most `batch_tokens` padded tokens. Right padding is harmless under causal attention: real
/// positions never attend to the padding after them.
pub fn teacher_states(
    teacher: &Teacher,
    samples: &[Sample],
    batch_tokens: usize,
) -> Result<Vec<Tensor>> {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| samples[i].input_ids.len());
    let mut states: Vec<Option<Tensor>> = (0..samples.len()).map(|_| None).collect();
    let device = teacher.device();
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len()
            && samples[order[end]].input_ids.len() * (end + 1 - start) <= batch_tokens
        {
            end += 1;
        }
        let batch = &order[start..end];
        let width = samples[*batch.last().unwrap()].input_ids.len() as i64;
        let mut ids = vec![0i64; batch.len() * width as usize];
        for (row, &i) in batch.iter().enumerate() {
            let src = &samples[i].input_ids;
            ids[row * width as usize..row * width as usize + src.len()].copy_from_slice(src);
        }
        let ids = Tensor::from_slice(&ids)
            .view([batch.len() as i64, width])
            .to_device(device);
        let positions = Tensor::arange(width, (Kind::Int64, device))
            .unsqueeze(0)
            .expand([batch.len() as i64, width], false);
        let u =
            tch::no_grad(|| teacher.forward(&ids, &positions, None, None)).to_device(Device::Cpu);
        for (row, &i) in batch.iter().enumerate() {
            let len = samples[i].input_ids.len() as i64;
            states[i] = Some(u.get(row as i64).narrow(0, 0, len));
        }
        start = end;
    }
    Ok(states
        .into_iter()
        .map(|s| s.expect("every sample is in a batch"))
        .collect())
}

fn write_shard(
    out: &Path,
    k: usize,
    block: &[Sample],
    states: &[Tensor],
    kind: Kind,
) -> Result<()> {
    let prenorm = Tensor::cat(states, 0).to_kind(kind).contiguous();
    let mut offsets = vec![0i64];
    for s in block {
        offsets.push(offsets.last().unwrap() + s.input_ids.len() as i64);
    }
    let dtype = if kind == Kind::BFloat16 {
        Dtype::BF16
    } else {
        Dtype::F16
    };
    let numel = prenorm.numel();
    let mut bytes = vec![0u8; numel * 2];
    prenorm.copy_data_u8(&mut bytes, numel);
    let offset_bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
    let shape: Vec<usize> = prenorm.size().iter().map(|&d| d as usize).collect();
    let views = [
        ("prenorm", TensorView::new(dtype, shape, &bytes)?),
        (
            "offsets",
            TensorView::new(Dtype::I64, vec![offsets.len()], &offset_bytes)?,
        ),
    ];
    let ids: Vec<&str> = block.iter().map(|s| s.id.as_str()).collect();
    let metadata = HashMap::from([("ids".to_string(), serde_json::to_string(&ids)?)]);
    let serialized = safetensors::serialize(views, Some(metadata))?;
    atomic_write(&shard_path(out, k), &serialized)
}

impl Manifest {
    /// The counts must fit together: the shards are exactly the samples cut into blocks of
    /// `SAMPLES_PER_SHARD` (what `clover distill` writes), each row `hidden_size` wide.
    fn check(&self, path: &Path) -> Result<()> {
        ensure!(
            self.samples_per_shard == SAMPLES_PER_SHARD,
            "{}: samples_per_shard = {}, but this clover reads caches of {SAMPLES_PER_SHARD}",
            path.display(),
            self.samples_per_shard
        );
        ensure!(
            self.shards == self.samples.div_ceil(SAMPLES_PER_SHARD),
            "{}: shards = {} does not fit samples = {} ({} shards of {SAMPLES_PER_SHARD})",
            path.display(),
            self.shards,
            self.samples,
            self.samples.div_ceil(SAMPLES_PER_SHARD)
        );
        ensure!(
            self.hidden_size >= 1,
            "{}: hidden_size = {} < 1",
            path.display(),
            self.hidden_size
        );
        Ok(())
    }

    /// Caches of older versions record the paths as given, relative to the directory distill ran
    /// in: usable only from there, so say so instead of failing on a missing directory or, worse,
    /// a false "changed since distillation".
    fn check_recorded_paths(&self, path: &Path) -> Result<()> {
        for (key, recorded) in [("data", &self.data), ("model", &self.model)] {
            ensure!(
                recorded.is_absolute() || recorded.exists(),
                "{}: {key} is recorded as the relative path {} (an older clover's cache), which \
                 names nothing from this directory: run from the directory distill ran in, or \
                 distill again",
                path.display(),
                recorded.display()
            );
        }
        Ok(())
    }
}

/// One opened cache shard: its map, its samples' token offsets, its dtype.
struct Shard {
    mmap: Mmap,
    offsets: Vec<i64>,
    kind: Kind,
}

impl Shard {
    /// Maps `file` and checks it holds `block`'s states: 16-bit prenorm rows of the manifest's
    /// hidden size, and i64 offsets that start at 0, step by each sample's token count and end
    /// at the last row.
    fn open(file: &Path, manifest: &Manifest, block: &[Sample]) -> Result<Self> {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        // SAFETY: shards are written once (temp + rename) and never modified in place.
        let mmap =
            unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", file.display()))?;
        let st = SafeTensors::deserialize(&mmap)
            .with_context(|| format!("{} is corrupt", file.display()))?;
        let view = |name: &str| {
            st.tensor(name)
                .with_context(|| format!("{}: no tensor {name}", file.display()))
        };
        let offs = view("offsets")?;
        ensure!(
            offs.dtype() == Dtype::I64 && offs.shape().len() == 1,
            "{}: offsets is {:?} of shape {:?}, expected a list of i64",
            file.display(),
            offs.dtype(),
            offs.shape()
        );
        let offsets: Vec<i64> = offs
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let prenorm = view("prenorm")?;
        let rows = match prenorm.shape() {
            [rows, h] if *h as i64 == manifest.hidden_size => *rows as i64,
            shape => bail!(
                "{}: prenorm has shape {shape:?}, but its {MANIFEST} says hidden size {}",
                file.display(),
                manifest.hidden_size
            ),
        };
        let mut expected = vec![0i64];
        for s in block {
            expected.push(expected.last().unwrap() + s.input_ids.len() as i64);
        }
        ensure!(
            offsets == expected && expected.last() == Some(&rows),
            "{}: token offsets (first {:?}, last {:?}, {} of them) and {rows} prenorm rows do \
             not match the {} samples ({} tokens) of the prepared data in {}",
            file.display(),
            offsets.first(),
            offsets.last(),
            offsets.len(),
            block.len(),
            expected.last().unwrap(),
            manifest.data.display()
        );
        let kind = match prenorm.dtype() {
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F16 => Kind::Half,
            other => bail!(
                "{}: prenorm has dtype {other:?}, expected 16-bit",
                file.display()
            ),
        };
        Ok(Self {
            mmap,
            offsets,
            kind,
        })
    }
}

/// A memory-mapped distillation cache, read by the trainer in offline mode.
pub struct DistillCache {
    samples: Vec<Sample>,
    shards: Vec<Mmap>,
    /// Per shard: token offsets of its samples.
    offsets: Vec<Vec<i64>>,
    hidden_size: i64,
    kind: Kind,
    dir: PathBuf,
    manifest: Manifest,
}

impl DistillCache {
    /// Open a finished cache; every shard must be present (a partial cache names what is missing)
    /// and agree with the manifest and the prepared data, so a damaged cache is refused here
    /// rather than read out of bounds later.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let manifest: Manifest = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        )
        .with_context(|| format!("{} is not a clover distill manifest", path.display()))?;
        manifest.check(&path)?;
        manifest.check_recorded_paths(&path)?;
        let missing: Vec<usize> = (0..manifest.shards)
            .filter(|&k| !shard_path(dir, k).exists())
            .collect();
        ensure!(
            missing.is_empty(),
            "{}: {} of {} shards are missing (first: {}); rerun `clover distill` to finish",
            dir.display(),
            missing.len(),
            manifest.shards,
            shard_path(dir, missing[0]).display()
        );
        let samples = read_split(&manifest.data, Split::Train)?;
        ensure!(
            samples.len() == manifest.samples,
            "{} changed since distillation: {} train samples now, {} then",
            manifest.data.display(),
            samples.len(),
            manifest.samples
        );
        let mut shards = vec![];
        let mut offsets = vec![];
        let mut kind = Kind::BFloat16;
        for (k, block) in samples.chunks(SAMPLES_PER_SHARD).enumerate() {
            let file = shard_path(dir, k);
            let shard = Shard::open(&file, &manifest, block)?;
            kind = shard.kind;
            offsets.push(shard.offsets);
            shards.push(shard.mmap);
        }
        Ok(Self {
            samples,
            shards,
            offsets,
            hidden_size: manifest.hidden_size,
            kind,
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// The shard file that holds training sample `i`'s states (for messages).
    pub fn shard_file_of(&self, i: usize) -> PathBuf {
        shard_path(&self.dir, i / SAMPLES_PER_SHARD)
    }

    /// Refuses a cache made from another teacher or other prepared data than a training run
    /// names, before its first step: the error names the cache and both values.
    pub fn check_against(&self, model_dir: &Path, data_dir: &Path, hidden_size: i64) -> Result<()> {
        let manifest = self.dir.join(MANIFEST);
        ensure!(
            same_path(&self.manifest.model, model_dir),
            "{}: the cache was distilled from the teacher {}, but training uses {}",
            manifest.display(),
            self.manifest.model.display(),
            model_dir.display()
        );
        ensure!(
            self.manifest.hidden_size == hidden_size,
            "{}: the cache holds states of hidden size {}, but the teacher {} has {}",
            manifest.display(),
            self.manifest.hidden_size,
            model_dir.display(),
            hidden_size
        );
        ensure!(
            same_path(&self.manifest.data, data_dir),
            "{}: the cache was made from the prepared data {}, but training uses {}",
            manifest.display(),
            self.manifest.data.display(),
            data_dir.display()
        );
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Sample `i` and its teacher pre-norm states [T,H] (16-bit, CPU). A non-finite state is
    /// refused here, naming the shard and the sample, rather than surfacing steps later as a
    /// non-finite loss that names neither.
    pub fn get(&self, i: usize) -> Result<(Sample, Tensor)> {
        ensure!(
            i < self.samples.len(),
            "sample {i} is out of range ({} samples)",
            self.samples.len()
        );
        let (k, j) = (i / SAMPLES_PER_SHARD, i % SAMPLES_PER_SHARD);
        let st = SafeTensors::deserialize(&self.shards[k])?;
        let view = st.tensor("prenorm")?;
        let row_bytes = self.hidden_size as usize * 2;
        let (a, b) = (self.offsets[k][j] as usize, self.offsets[k][j + 1] as usize);
        let bytes = &view.data()[a * row_bytes..b * row_bytes];
        let states = Tensor::from_data_size(bytes, &[(b - a) as i64, self.hidden_size], self.kind);
        let sample = &self.samples[i];
        if let Some(token) = first_non_finite_row(&states) {
            bail!(
                "{}: {} row {j} (sample {:?}, train sample {i}) holds a non-finite teacher state \
                 at token {token}: the cache is damaged; delete that shard and rerun `clover \
                 distill` to recompute it",
                self.dir.display(),
                shard_path(&self.dir, k).display(),
                sample.id
            );
        }
        Ok((sample.clone(), states))
    }
}

/// The first row of `states` [T,H] holding a NaN or an infinity, if any.
fn first_non_finite_row(states: &Tensor) -> Option<i64> {
    let bad = states.isfinite().logical_not().any_dim(1, false);
    let first = bad.nonzero();
    (first.size()[0] > 0).then(|| first.int64_value(&[0, 0]))
}

/// Two names of one directory (relative or absolute, through links) count as the same.
fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
