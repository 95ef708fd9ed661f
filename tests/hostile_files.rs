//! Hostile files: damaged or self-contradicting inputs (distillation caches, prepared parquet,
//! token ids of another model, teacher and head configs that disagree with their weights,
//! calibration files, duration variables) end in an error that names the file, the key and the
//! value: never a panic, never a silent run. Every case runs its control first: the same
//! command on the good input succeeds, so each refusal is the bad value's doing.

use std::path::{Path, PathBuf};

use crate::common::{
    fixture, free_port, run_clover, run_clover_env, scratch_dir, write_tiny_prepared,
    write_tiny_train_toml, Scratch,
};
use clover::decode::calibrate::Calibration;
use clover::model::head::DraftHead;
use clover::model::head_config::HeadConfig;
use clover::model::teacher::Teacher;
use clover::training::config::TrainConfig;
use clover::training::export::export_head;
use tch::{Device, Kind, Tensor};

/// A failed run: non-zero exit, no panic, and every one of `named` in its output.
fn assert_refused((code, text): (i32, String), named: &[&str]) {
    assert_ne!(code, 0, "exited 0:\n{text}");
    assert!(!text.contains("panicked"), "panicked:\n{text}");
    for n in named {
        assert!(text.contains(n), "{n:?} is not named in:\n{text}");
    }
}

/// A failed load: its error (with its causes) names every one of `named`.
fn assert_names<T>(result: anyhow::Result<T>, named: &[&str]) {
    let err = match result {
        Ok(_) => panic!("accepted; expected an error naming {named:?}"),
        Err(e) => format!("{e:#}"),
    };
    for n in named {
        assert!(err.contains(n), "{n:?} is not named in: {err}");
    }
}

fn tied() -> PathBuf {
    fixture("tiny-llama-tied")
}

fn distill(data: &Path, out: &Path) -> (i32, String) {
    run_clover(&[
        "distill",
        "--data",
        data.to_str().unwrap(),
        "--model",
        tied().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ])
}

/// `clover train` on a fresh one-step config (its own out dir, `name`) over `root`'s data,
/// offline from `root/cache` when `offline`.
fn train(root: &Path, name: &str, offline: bool) -> (i32, String) {
    let config = root.join(format!("{name}.toml"));
    let cache = root.join("cache");
    write_tiny_train_toml(
        &config,
        &tied(),
        &root.join("data"),
        offline.then_some(cache.as_path()),
        &root.join(name),
    );
    run_clover(&["train", "--config", config.to_str().unwrap()])
}

/// Tiny prepared data and its distillation cache in a scratch dir, and the control: a training
/// step reads the cache.
fn distilled(name: &str) -> Scratch {
    let root = scratch_dir("hostile-files", name);
    write_tiny_prepared(&root.join("data"));
    let (code, text) = distill(&root.join("data"), &root.join("cache"));
    assert_eq!(code, 0, "{text}");
    let (code, text) = train(&root, "control", true);
    assert_eq!(code, 0, "the good cache does not train:\n{text}");
    root
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(path, json.to_string()).unwrap();
}

/// Rewrites the tensors of a safetensors file through `edit`.
fn edit_tensors(path: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let mut tensors = Tensor::read_safetensors(path).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, path).unwrap();
}

fn tensor<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors.iter().find(|t| t.0 == name).unwrap().1
}

// --- distillation caches --------------------------------------------------------------------

/// A manifest whose shard count does not fit its samples was an index out of bounds.
#[test]
fn a_distill_manifest_whose_shards_do_not_fit_its_samples_is_refused() {
    let root = distilled("manifest");
    let manifest = root.join("cache/distill.json");
    let good = std::fs::read_to_string(&manifest).unwrap();
    for (key, value, named) in [
        // An index out of bounds at the first batch before; 2 was refused as a missing shard.
        (
            "shards",
            0,
            "shards = 0 does not fit samples = 6 (1 shards of 256)",
        ),
        ("shards", 2, "shards = 2 does not fit samples = 6"),
        ("samples_per_shard", 4, "samples_per_shard = 4"),
    ] {
        std::fs::write(&manifest, &good).unwrap();
        edit_json(&manifest, |j| j[key] = value.into());
        assert_refused(
            train(&root, &format!("{key}{value}"), true),
            &["distill.json", named],
        );
    }
}

/// Offsets shifted past the rows (their differences, the token counts, unchanged) were a slice
/// out of range at the first batch.
#[test]
fn shard_offsets_that_do_not_fit_the_prenorm_rows_are_refused() {
    let root = distilled("offsets");
    edit_tensors(&root.join("cache/shard-00000.safetensors"), |t| {
        let i = t.iter().position(|x| x.0 == "offsets").unwrap();
        t[i].1 = &t[i].1 + 1000;
    });
    assert_refused(
        train(&root, "shifted", true),
        &[
            "shard-00000.safetensors",
            "offsets (first Some(1000)",
            "48 prenorm rows",
        ],
    );
}

/// A NaN in one sample's states was only seen steps later as a non-finite loss.
#[test]
fn a_non_finite_cache_state_is_named_with_its_shard_and_sample() {
    let root = distilled("nan");
    edit_tensors(&root.join("cache/shard-00000.safetensors"), |t| {
        // Sample s2 holds rows 16..24 (8 tokens each): poison its token 3.
        let _ = tensor(t, "prenorm").get(16 + 3).get(5).fill_(f64::NAN);
    });
    assert_refused(
        train(&root, "nan", true),
        &[
            &root.join("cache").display().to_string(),
            "shard-00000.safetensors row 2",
            "\"s2\"",
            "non-finite teacher state at token 3",
        ],
    );
}

// --- token ids and prepared parquet ---------------------------------------------------------

/// Ids past the teacher's vocabulary were a libtorch abort in distill and train.
#[test]
fn token_ids_past_the_vocabulary_are_refused_in_distill_and_train() {
    use clover::data::shards::{read_split, write_samples, Split};
    let root = scratch_dir("hostile-files", "vocab");
    let data = root.join("data");
    write_tiny_prepared(&data);
    let (code, text) = train(&root, "control", false);
    assert_eq!(code, 0, "{text}");
    let mut samples = read_split(&data, Split::Train).unwrap();
    // The tiny teacher has 96 ids (0..=95): 96 is the first one past it.
    samples[3].input_ids[5] = 96;
    write_samples(&data, Split::Train, &samples).unwrap();
    let named = ["\"s3\"", "token id 96 at position 5", "(96 ids)"];
    assert_refused(train(&root, "online", false), &named);
    let data_dir = data.display().to_string();
    assert_refused(
        distill(&data, &root.join("cache")),
        &[&data_dir, named[0], named[1], named[2]],
    );
}

/// A model dir of the tiny teacher with SmolLM2's tokenizer (49,152 ids over the teacher's 96).
fn teacher_with_foreign_tokenizer(root: &Path) -> PathBuf {
    let model = root.join("model");
    copy_model(&tied(), &model);
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(
            crate::common::fixture_model_dir().join(file),
            model.join(file),
        )
        .unwrap();
    }
    model
}

fn copy_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

fn generate(model: &Path, prompt: &str, draft: Option<&Path>) -> (i32, String) {
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--prompt".into(),
        prompt.into(),
        "--max-new-tokens".into(),
        "2".into(),
        "--device".into(),
        "cpu".into(),
    ];
    if let Some(d) = draft {
        args.extend(["--draft".into(), d.display().to_string()]);
    }
    run_clover(&args)
}

/// A tokenizer from another model produced ids the teacher has no row for: a libtorch abort.
#[test]
fn generate_refuses_prompt_ids_from_another_models_tokenizer() {
    let root = scratch_dir("hostile-files", "tokenizer");
    let model = teacher_with_foreign_tokenizer(&root);
    // "!" is SmolLM2's id 17, inside the tiny vocabulary.
    let (code, text) = generate(&model, "!", None);
    assert_eq!(code, 0, "{text}");
    assert_refused(
        generate(&model, "the sea", None),
        &["the prompt", "outside the vocabulary", "(96 ids)"],
    );
}

/// A prepared train shard whose `column` has a null item in row 1 and, with `null_list`, a
/// null list in row 2 (arrow keeps a value under each null slot, which was read as data).
fn write_parquet_with_nulls(path: &Path, column: &str, null_item: bool, null_list: bool) {
    use arrow::array::{
        ArrayRef, Int32Builder, ListBuilder, RecordBatch, StringBuilder, UInt8Builder,
    };
    use std::sync::Arc;
    let mut ids = StringBuilder::new();
    let mut tokens = ListBuilder::new(Int32Builder::new());
    let mut mask = ListBuilder::new(UInt8Builder::new());
    for row in 0..4 {
        ids.append_value(format!("s{row}"));
        for t in 0..6 {
            let null = null_item && row == 1 && t == 4;
            match (column, null) {
                ("input_ids", true) => tokens.values().append_null(),
                _ => tokens.values().append_value(3 + t),
            }
            match (column, null) {
                ("loss_mask", true) => mask.values().append_null(),
                _ => mask.values().append_value(1),
            }
        }
        let list_null = null_list && row == 2;
        tokens.append(!(list_null && column == "input_ids"));
        mask.append(!(list_null && column == "loss_mask"));
    }
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("id", Arc::new(ids.finish())),
        ("input_ids", Arc::new(tokens.finish())),
        ("loss_mask", Arc::new(mask.finish())),
    ];
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn nulls_in_prepared_parquet_are_refused_naming_file_row_and_column() {
    use clover::data::shards::{read_split, Split};
    let root = scratch_dir("hostile-files", "nulls");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let shard = data.join("train-00000.parquet");
    write_parquet_with_nulls(&shard, "input_ids", false, false);
    assert_eq!(read_split(&data, Split::Train).unwrap().len(), 4);
    let file = shard.display().to_string();
    for column in ["input_ids", "loss_mask"] {
        write_parquet_with_nulls(&shard, column, true, false);
        let at = format!("column {column} holds a null at position 4");
        assert_names(
            read_split(&data, Split::Train),
            &[&file, "row 1 (sample \"s1\")", &at],
        );
        write_parquet_with_nulls(&shard, column, false, true);
        let null = format!("column {column} is null");
        assert_names(
            read_split(&data, Split::Train),
            &[&file, "row 2 (sample \"s2\")", &null],
        );
    }
    // The command that reads it first, `train`, fails the same way instead of panicking.
    write_parquet_with_nulls(&shard, "input_ids", false, true);
    assert_refused(
        train(&root, "nulls", false),
        &[&file, "column input_ids is null"],
    );
}

// --- teacher configs ------------------------------------------------------------------------

/// A copy of the tiny teacher with `edit` applied to its config.json.
fn edited_teacher(root: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = root.join(name);
    copy_model(&tied(), &dir);
    edit_json(&dir.join("config.json"), edit);
    dir
}

fn load(dir: &Path) -> anyhow::Result<Teacher> {
    Teacher::load(dir, Device::Cpu, Kind::Float)
}

#[test]
fn a_teacher_config_out_of_range_or_against_its_weights_is_refused() {
    let root = scratch_dir("hostile-files", "teacher");
    load(&edited_teacher(&root, "control", |_| {})).unwrap();
    let cases: [(&str, serde_json::Value, &str); 7] = [
        // Two layers of weights under a config of one: layer 1 went unread.
        (
            "num_hidden_layers",
            1.into(),
            "model.layers.1.input_layernorm.weight",
        ),
        ("num_hidden_layers", 0.into(), "num_hidden_layers: 0 < 1"),
        (
            "rms_norm_eps",
            (-1e-5).into(),
            "rms_norm_eps: -0.00001 is not a finite number > 0",
        ),
        (
            "rope_theta",
            0.into(),
            "rope_theta: 0 is not a finite number > 0",
        ),
        ("rope_theta", (-1.0).into(), "rope_theta: -1 is not"),
        // A remainder by zero before.
        (
            "num_key_value_heads",
            0.into(),
            "num_key_value_heads: 0 < 1",
        ),
        (
            "vocab_size",
            95.into(),
            "model.embed_tokens.weight has shape [96, 64]",
        ),
    ];
    for (key, value, named) in cases {
        let dir = edited_teacher(&root, key, |j| j[key] = value.clone());
        let config = dir.join("config.json").display().to_string();
        let origin = if named.contains("model.") {
            dir.display().to_string()
        } else {
            config
        };
        assert_names(load(&dir), &[&origin, named]);
    }
    // The layer-count case from the command line: an error, not garbage with exit 0.
    let dir = edited_teacher(&root, "cli", |j| j["num_hidden_layers"] = 1.into());
    assert_refused(
        generate(&dir, "!", None),
        &[
            "9 weights are not used by config.json (1 layers)",
            "model.layers.1.",
        ],
    );
}

#[test]
fn a_model_path_that_is_a_file_is_called_a_file() {
    let file = tied().join("config.json");
    assert_refused(generate(&file, "!", None), &["is a file, not a directory"]);
    let missing = tied().join("absent");
    assert_refused(generate(&missing, "!", None), &["does not exist"]);
}

// --- exported heads -------------------------------------------------------------------------

/// A reference-init Clover-2 head (the default five depths, as deep as the default tree)
/// exported next to the tiny teacher in `root/head`, and the control: it loads.
fn exported_head(root: &Path) -> (Teacher, PathBuf) {
    let teacher = load(&tied()).unwrap();
    let cfg = HeadConfig::from_teacher(&teacher.config);
    let head = DraftHead::new(&teacher, cfg.clone(), 1).unwrap();
    let out = root.join("head");
    let frozen = teacher.lm_head_weight().shallow_clone();
    export_head(
        &cfg,
        &head.named_tensors(),
        &tied().join("config.json"),
        Some(&frozen),
        &out,
    )
    .unwrap();
    DraftHead::load(&out, &teacher).unwrap();
    (teacher, out)
}

/// The same values a training config refuses, refused in an exported head's config.json with
/// the same words (one check for both); a negative epsilon was a libtorch abort.
#[test]
fn a_head_config_out_of_range_is_refused_as_a_training_config_is() {
    let root = scratch_dir("hostile-files", "head-config");
    let (teacher, head) = exported_head(&root);
    let config = head.join("config.json");
    let good = std::fs::read_to_string(&config).unwrap();
    let cases: [(&str, &str, f64, &str); 4] = [
        (
            "",
            "rms_norm_eps",
            -1e-6,
            "rms_norm_eps: -0.000001 is not a finite number > 0",
        ),
        (
            "clover",
            "decay_coefficient",
            -0.5,
            "decay: -0.5 is outside (0, 1]",
        ),
        (
            "clover_rs",
            "draft_rope_theta",
            0.0,
            "draft_rope_theta: 0 is not a finite number > 0",
        ),
        (
            "clover",
            "heads_coefficient",
            -1.0,
            "heads_coefficient: -1 is not a finite number",
        ),
    ];
    for (section, key, value, problem) in cases {
        std::fs::write(&config, &good).unwrap();
        edit_json(&config, |j| match section {
            "" => j[key] = value.into(),
            s => j[s][key] = value.into(),
        });
        assert_names(
            DraftHead::load(&head, &teacher),
            &[&config.display().to_string(), problem],
        );
        let train_key = problem.split(':').next().unwrap();
        if train_key != "rms_norm_eps" {
            let toml = format!(
                "model_dir = \"m\"\ndata_dir = \"d\"\nout_dir = \"o\"\nmax_steps = 1\n\
                 {train_key} = {value:?}\n"
            );
            assert_names(
                TrainConfig::from_toml(&toml, "t.toml"),
                &["t.toml", problem],
            );
        }
    }
    // From the command line: an error, not a libtorch abort.
    std::fs::write(&config, &good).unwrap();
    let model = teacher_with_foreign_tokenizer(&root);
    let (code, text) = generate(&model, "!", Some(&head));
    assert_eq!(code, 0, "{text}");
    edit_json(&config, |j| j["rms_norm_eps"] = (-1e-6).into());
    assert_refused(
        generate(&model, "!", Some(&head)),
        &["config.json", "rms_norm_eps"],
    );
}

/// Weights the head's config.json does not describe were ignored; missing ones are refused.
#[test]
fn head_weights_that_disagree_with_the_config_are_refused() {
    let root = scratch_dir("hostile-files", "head-weights");
    let (teacher, head) = exported_head(&root);
    let weights = head.join("model.safetensors");
    let good = std::fs::read(&weights).unwrap();
    edit_tensors(&weights, |t| {
        let extra = tensor(t, "layers.1.self_attn.q_proj.weight").copy();
        t.push(("layers.2.self_attn.q_proj.weight".into(), extra));
    });
    assert_names(
        DraftHead::load(&head, &teacher),
        &[
            &weights.display().to_string(),
            "1 tensors are not part of the head",
            "clover2 with num_layers = 2",
            "layers.2.self_attn.q_proj.weight",
        ],
    );
    std::fs::write(&weights, &good).unwrap();
    edit_tensors(&weights, |t| t.retain(|x| x.0 != "clover_norm.weight"));
    assert_names(
        DraftHead::load(&head, &teacher),
        &[&weights.display().to_string(), "missing clover_norm.weight"],
    );
}

// --- calibration files ----------------------------------------------------------------------

/// A calibration file as `clover calibrate` writes one, with `costs` patched by `edit`.
fn calibration(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json = serde_json::json!({
        "device": "Cpu", "dtype": "Float", "draft_vocab": null, "top_k": 2,
        "acceptance": [[0.5, 0.2], [0.5, 0.2]], "trials": [100, 50],
        "verify_by_context": [{"context": 128, "ms": {"points": [[1, 10.0], [8, 12.0]]}}],
        "costs": {"verify_ms": {"points": [[1, 10.0], [8, 12.0]]},
                  "draft_step_ms": {"points": [[1, 1.0]]}, "depth0_ms": 1.0, "plain_ms": 10.0}
    });
    edit(&mut json);
    std::fs::write(path, json.to_string()).unwrap();
}

#[test]
fn calibration_files_with_empty_or_free_costs_are_refused() {
    use clover::decode::tree_search::{best_tree, SearchLimits};
    let root = scratch_dir("hostile-files", "calib");
    let path = root.join("calib.json");
    calibration(&path, |_| {});
    let good = Calibration::read(&path).unwrap();
    let limits = SearchLimits {
        max_nodes: 8,
        max_depth: 2,
    };
    assert!(best_tree(&good.acceptance, &good.costs, limits)
        .tokens_per_s
        .is_finite());
    let file = path.display().to_string();
    let cases: [(&str, serde_json::Value, &str); 6] = [
        // Reading an empty curve was an index out of bounds.
        (
            "/costs/verify_ms/points",
            serde_json::json!([]),
            "costs.verify_ms: no points",
        ),
        (
            "/costs/draft_step_ms/points",
            serde_json::json!([]),
            "costs.draft_step_ms: no points",
        ),
        // Free or negative costs predicted infinite speed.
        (
            "/costs/draft_step_ms/points",
            serde_json::json!([[1, 0.0]]),
            "0 ms at size 1",
        ),
        (
            "/costs/verify_ms/points",
            serde_json::json!([[1, -3.0]]),
            "-3 ms at size 1",
        ),
        (
            "/costs/plain_ms",
            0.into(),
            "costs.plain_ms: 0 is not a finite time > 0",
        ),
        (
            "/costs/depth0_ms",
            (-1.0).into(),
            "costs.depth0_ms: -1 is not",
        ),
    ];
    for (pointer, value, named) in cases {
        calibration(&path, |j| *j.pointer_mut(pointer).unwrap() = value);
        assert_names(Calibration::read(&path), &[&file, named]);
    }
    calibration(&path, |j| j["acceptance"] = serde_json::json!([[]]));
    assert_names(
        Calibration::read(&path),
        &[&file, "acceptance: empty table"],
    );
}

// --- duration variables ---------------------------------------------------------------------

/// Out-of-range progress intervals were a Duration panic (1e20), a flood of lines (1e-6) or a
/// silent fall-back (garbage): now the job runs on at the default, saying so once.
#[test]
fn a_progress_interval_out_of_range_is_named_and_the_default_kept() {
    let root = scratch_dir("hostile-files", "progress");
    write_tiny_prepared(&root.join("data"));
    for (i, value) in ["1e20", "1e-6", "soon", "0.5"].into_iter().enumerate() {
        let started = std::time::Instant::now();
        let (code, text) = run_clover_env(
            &[
                "distill",
                "--data",
                root.join("data").to_str().unwrap(),
                "--model",
                tied().to_str().unwrap(),
                "--out",
                root.join(format!("cache{i}")).to_str().unwrap(),
                "--device",
                "cpu",
            ],
            &[("CLOVER_PROGRESS_SECS", value)],
        );
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(code, 0, "{value}: {text}");
        assert!(!text.contains("panicked"), "{value}: {text}");
        let warned = text.contains(&format!(
            "CLOVER_PROGRESS_SECS = \"{value}\" is not a number of seconds in 0.1 ..= 86400"
        ));
        // 0.5 is in range (the control); the others fall back to 30 s.
        assert_eq!(warned, value != "0.5", "{value}: {text}");
        let interval = if warned { 30.0 } else { 0.5 };
        let lines = text.lines().filter(|l| l.starts_with("[distill")).count();
        // One line per interval of the run at most, and the final one.
        assert!(
            lines as f64 <= secs / interval + 2.0,
            "{value}: {lines} lines in {secs:.1} s"
        );
    }
}

/// A collective timeout out of range was a Duration panic (1e300): now an error naming it.
#[test]
fn a_collective_timeout_out_of_range_is_an_error_naming_it() {
    let root = scratch_dir("hostile-files", "timeout");
    let config = root.join("t.toml");
    write_tiny_train_toml(
        &config,
        &tied(),
        &root.join("data"),
        None,
        &root.join("out"),
    );
    let port = free_port().to_string();
    let run = |timeout: &str| {
        run_clover_env(
            &["train", "--config", config.to_str().unwrap()],
            &[
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "0"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", &port),
                ("CLOVER_DIST_TIMEOUT", timeout),
            ],
        )
    };
    // The control: 1 s is accepted, and the rendezvous itself times out waiting for rank 1.
    let (code, text) = run("1");
    assert_ne!(code, 0, "{text}");
    assert!(
        !text.contains("CLOVER_DIST_TIMEOUT =") && !text.contains("panicked"),
        "{text}"
    );
    for value in ["1e300", "0", "0.5", "NaN", "1e7"] {
        assert_refused(
            run(value),
            &[&format!(
                "CLOVER_DIST_TIMEOUT = \"{value}\" is not a number of seconds in 1 ..= 604800"
            )],
        );
    }
}
