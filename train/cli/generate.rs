//! `clover generate`: answer one prompt with the teacher, plainly or speculatively with a draft head.

use anyhow::Result;

use crate::decode::generate::{generate, GenerationConfig};
use crate::decode::tree_spec::TreeSpec;
use crate::model::teacher::Teacher;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Teacher model directory (HF layout).
    #[arg(long)]
    pub model: std::path::PathBuf,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, allow_negative_numbers = true, value_parser = crate::checks::temperature, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub run_on: crate::model::device::RunOn,
    /// Print one JSON object {"text", "token_ids", "tokens_per_s"} instead of the text.
    #[arg(long)]
    pub json: bool,
    /// Exported draft head (Clover-2, EAGLE-1 or Medusa): decode speculatively with it and report tau.
    #[arg(long)]
    pub draft: Option<std::path::PathBuf>,
    /// Speculation tree with --draft: default (mc_sim_7b_63) or a JSON file with a list of
    /// paths (the names `eval --tree` reads).
    #[arg(long, default_value = "default")]
    pub tree: TreeSpec,
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let (device, kind) = args.run_on.resolve()?;
    let teacher = Teacher::load(&args.model, device, kind)?;
    // Without --chat no template is rendered; naming a built-in one keeps a model that has no
    // chat_template of its own usable for plain completion.
    let template = if args.chat { None } else { Some("chatml") };
    let chat = crate::formats::chat::ChatTokenizer::from_model_dir(&args.model, template)?;
    let (prompt, stop_ids) = if args.chat {
        let messages = [crate::formats::chat::Message::new(
            crate::formats::chat::Role::User,
            args.prompt.clone(),
        )];
        (chat.encode_prompt(&messages)?, chat.stop_ids())
    } else {
        let encoding = chat
            .tokenizer
            .encode(args.prompt.as_str(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
        let ids = encoding.get_ids().iter().map(|&i| i as i64).collect();
        (ids, teacher.config.eos_token_ids.clone())
    };
    let cfg = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        seed: args.seed,
        stop_ids,
    };
    let (timed, spec) = match &args.draft {
        None => (generate(&teacher, &prompt, &cfg)?, None),
        Some(dir) => {
            let head = crate::model::head::load_head(dir, &teacher)?;
            let tree = args.tree.static_tree("generate")?;
            let sampling = crate::decode::sampling::Sampling {
                temperature: cfg.temperature,
                seed: cfg.seed as i64,
            };
            let (timed, stats) = crate::decode::speculative::generate_speculative(
                &teacher,
                &head,
                &tree,
                &prompt,
                cfg.max_new_tokens,
                sampling,
                &cfg.stop_ids,
            )?;
            (timed, Some(stats))
        }
    };
    let text = chat.decode(&timed.answer.token_ids)?;
    let n = timed.answer.token_ids.len();
    let tokens_per_s = n as f64 / (timed.prefill_seconds + timed.decode_seconds);
    if args.json {
        let mut out = serde_json::json!({
            "text": text,
            "token_ids": timed.answer.token_ids,
            "tokens_per_s": tokens_per_s,
        });
        if let Some(stats) = &spec {
            out["tau"] = stats.tau().into();
            out["verification_steps"] = stats.steps().into();
            out["accepted_per_step"] = serde_json::json!(stats.accepted);
        }
        println!("{out}");
    } else {
        println!("{text}");
        match &spec {
            None => eprintln!("[{n} tokens, {tokens_per_s:.1} tokens/s]"),
            Some(stats) => eprintln!(
                "[{n} tokens, {tokens_per_s:.1} tokens/s, speculative: tau {:.2} over {} steps]",
                stats.tau(),
                stats.steps()
            ),
        }
    }
    Ok(())
}
