//! `clover eval`: speculative against plain decoding on held-out prompts.

use std::path::PathBuf;

use anyhow::Result;

use crate::formats::chat::TemplateName;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Teacher model directory (HF layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Exported draft head directory (model.safetensors + config.json).
    #[arg(long)]
    pub draft: PathBuf,
    /// JSONL questions: {"question_id", "category", "turns": [..]} (MT-bench / Spec-Bench).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Tree: "mc_sim_7b_63" (default) or a JSON file with a list of paths.
    #[arg(long)]
    pub tree: Option<String>,
    /// 0 = greedy; > 0 = lossless tree speculative sampling.
    #[arg(long, allow_negative_numbers = true, value_parser = crate::checks::temperature, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Device and dtype; the head runs in the teacher's dtype.
    #[command(flatten)]
    pub run_on: crate::model::device::RunOn,
    /// Evaluate only the first N questions.
    #[arg(long, value_parser = crate::checks::positive)]
    pub limit: Option<usize>,
    /// Evaluate only the first N questions of each category (applied before --limit), so a
    /// small run still covers every category.
    #[arg(long, value_parser = crate::checks::positive)]
    pub per_category: Option<usize>,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Chat template: the model's own by default ("auto"), or vicuna / llama3 / chatml.
    #[arg(long, value_enum)]
    pub template: Option<TemplateName>,
    /// Base seed; question i uses seed + i (the reference seeds per question).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Untimed warm-up generations (of each decoder) before measuring.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Leave out the reference's default system prompt of LLaMA-3 templates (conversations keep
    /// their own system message either way).
    #[arg(long)]
    pub no_system_prompt: bool,
}

impl EvalArgs {
    /// The library's plain options for this command line.
    pub fn options(&self) -> crate::decode::eval::EvalOptions {
        crate::decode::eval::EvalOptions {
            model: self.model.clone(),
            draft: self.draft.clone(),
            prompts: self.prompts.clone(),
            tree: self.tree.clone(),
            temperature: self.temperature,
            max_new_tokens: self.max_new_tokens,
            run_on: self.run_on.clone(),
            limit: self.limit,
            per_category: self.per_category,
            report: self.report.clone(),
            template: self.template,
            seed: self.seed,
            warmup: self.warmup,
            no_system_prompt: self.no_system_prompt,
        }
    }
}

pub fn run(args: &EvalArgs) -> Result<()> {
    crate::decode::eval::run(&args.options())
}
