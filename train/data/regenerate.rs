//! Self-distillation data: keep each conversation's user turns and replace every assistant turn
//! by the teacher's own answer, so the draft head learns the distribution it will be asked to
//! predict at decoding time. (The Clover-2 reference trains on the ShareGPT text as-is, docs/clover2.md §3;
//! regeneration is the EAGLE/Medusa-style option users ask for with small or mismatched data.)
//!
//! Conversations are answered in batches of `--batch-size`, turn by turn, with left-padded batched
//! generation. To keep padding low, batches are formed over the conversations sorted by the
//! length of their first prompt (a stable, deterministic order). Batch k always covers the same
//! conversations and samples with seed `seed + k`, and is written as its own part file (temp +
//! rename). An interrupted run therefore resumes at the first missing part and produces exactly
//! what an uninterrupted run would; the final file lists the conversations in input order.
//! `--shard i/N` makes this worker answer the batches k with k % N == i (RANK/WORLD_SIZE under
//! torchrun or srun), so many devices share one output dir; whichever worker finds every part
//! written merges them.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use crate::data::jobfiles::{atomic_write, pin_inputs, DirLock};
use crate::data::sharegpt::{read_conversations, skip_report, Conversation};
use crate::decode::generate::{generate_batch, GenerationConfig};
use crate::formats::chat::{ChatTokenizer, Message, Role, TemplateName};
use crate::model::teacher::Teacher;
use crate::progress::Progress;

#[derive(Debug)]
pub struct RegenerateOptions {
    /// Conversations to answer (ShareGPT JSON/JSONL or parquet, as `data prepare` reads).
    pub data: PathBuf,
    /// Teacher model directory.
    pub model: PathBuf,
    /// Output directory: part files and, when complete, conversations.jsonl.
    pub out: PathBuf,
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub batch_size: usize,
    /// Answer at most this many user turns per conversation (later turns are dropped).
    pub max_turns: Option<usize>,
    /// Use only the first N conversations of the input.
    pub limit: Option<usize>,
    /// Chat template (vicuna, llama3, chatml or auto = the model's own).
    pub template: TemplateName,
    pub seed: u64,
    pub run_on: crate::model::device::RunOn,
    /// Stop after this many batches in this run (the rest is left for a rerun).
    pub max_batches: Option<usize>,
    /// Which of the batches this worker answers, as i/N.
    pub shard: String,
    /// Conversations whose first prompt is longer are left out; a later turn whose prompt would
    /// be longer ends its conversation there.
    pub max_prompt_tokens: usize,
    /// Leave out the reference's default system prompt of LLaMA-3 templates (conversations keep
    /// their own system message either way).
    pub no_system_prompt: bool,
}

pub const OUTPUT_FILE: &str = "conversations.jsonl";
const MANIFEST: &str = "regenerate.json";

/// Whether `name` is a file regenerate writes (recognises its outputs from before markers).
pub fn is_output_file(name: &str) -> bool {
    name == OUTPUT_FILE
        || name == MANIFEST
        || name.starts_with(".lock-")
        || (name.starts_with("part-") && name.ends_with(".jsonl"))
}

/// Everything that decides the output; `max_batches` and the device only decide how far and
/// where a run goes.
fn inputs_of(args: &RegenerateOptions) -> serde_json::Value {
    serde_json::json!({
        "data": args.data, "model": args.model, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "batch_size": args.batch_size, "max_turns": args.max_turns,
        "limit": args.limit, "template": args.template.as_str(), "seed": args.seed,
        "max_prompt_tokens": args.max_prompt_tokens, "no_system_prompt": args.no_system_prompt,
    })
}

pub fn run(args: &RegenerateOptions) -> Result<()> {
    let (worker, workers) = crate::distributed::parse_shard(&args.shard)?;
    let (device, kind) = args.run_on.resolve()?;
    let teacher = Teacher::load(&args.model, device, kind)?;
    let chat = ChatTokenizer::from_model_dir(&args.model, Some(args.template.as_str()))?
        .with_system_prompt(!args.no_system_prompt);
    let (mut conversations, skipped) = read_conversations(&args.data)?;
    if let Some(report) = skip_report(&args.data, &skipped) {
        eprintln!("{report}");
    }
    conversations.truncate(args.limit.unwrap_or(usize::MAX));
    let prompts: Vec<Vec<Message>> = conversations
        .iter()
        .map(|c| user_turns(c, args.max_turns))
        .collect();
    // A prompt must leave room for the answer in the teacher's context: longer ones are left out
    // (and counted), not failed, so one long record cannot stop a long job.
    let context = teacher.config.max_position_embeddings.max(0) as usize;
    ensure!(
        args.max_new_tokens < context,
        "--max-new-tokens {} does not fit the teacher's context of {context} positions",
        args.max_new_tokens
    );
    let prompt_cap = args.max_prompt_tokens.min(context - args.max_new_tokens);
    let order = batch_order(&chat, &prompts, prompt_cap)?;
    if order.len() < prompts.len() {
        eprintln!(
            "left out {} conversations whose first prompt exceeds {} tokens",
            prompts.len() - order.len(),
            prompt_cap
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let _lock = DirLock::acquire(&args.out, &format!("regenerate-{worker}-of-{workers}"))?;
    pin_inputs(&args.out.join(MANIFEST), &inputs_of(args))?;
    let batch_size = args.batch_size.max(1);
    let batches = order.len().div_ceil(batch_size);
    let mine = (0..batches).filter(|k| k % workers == worker).count();
    let todo: Vec<usize> = (0..batches)
        .filter(|k| k % workers == worker && !part_path(&args.out, *k).exists())
        .take(args.max_batches.unwrap_or(usize::MAX))
        .collect();
    let mut bar = Progress::new("regenerate (batches)", mine as u64);
    bar.resume_from((mine - todo.len().min(mine)) as u64);
    let started = std::time::Instant::now();
    let mut new_tokens = 0;
    for k in todo {
        let members = &order[k * batch_size..((k + 1) * batch_size).min(order.len())];
        let batch_prompts: Vec<Vec<Message>> =
            members.iter().map(|&i| prompts[i].clone()).collect();
        let cfg = GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            seed: args.seed + k as u64,
            stop_ids: chat.stop_ids(),
        };
        let (answered, tokens) = answer_batch(&teacher, &chat, &batch_prompts, &cfg, prompt_cap)?;
        new_tokens += tokens;
        let lines: String = members
            .iter()
            .zip(&answered)
            .map(|(&i, messages)| sharegpt_line(&conversations[i].id, messages))
            .collect::<Result<Vec<_>>>()?
            .concat();
        atomic_write(&part_path(&args.out, k), lines.as_bytes())?;
        bar.set_message(format!(
            "{:.1} tok/s",
            new_tokens as f64 / started.elapsed().as_secs_f64()
        ));
        bar.inc(1);
    }
    bar.finish();
    if (0..batches).all(|k| part_path(&args.out, k).exists()) {
        let written = merge_in_input_order(&args.out, batches, &conversations)?;
        println!(
            "wrote {written} conversations to {}",
            args.out.join(OUTPUT_FILE).display()
        );
    } else if workers > 1 {
        println!("this worker's part is done; the last worker to finish merges the parts");
    } else {
        println!("stopped early; rerun the same command to continue");
    }
    Ok(())
}

/// Indices of the conversations to answer, sorted by the token length of their first prompt
/// (stable, so ties keep input order); first prompts over `max_prompt_tokens` are left out.
fn batch_order(
    chat: &ChatTokenizer,
    prompts: &[Vec<Message>],
    max_prompt_tokens: usize,
) -> Result<Vec<usize>> {
    let mut lengths = vec![];
    for (i, prompt) in prompts.iter().enumerate() {
        let Some(first_user) = prompt.iter().position(|m| m.role == Role::User) else {
            continue;
        };
        if let Some(ids) = prompt_within(chat, &prompt[..=first_user], max_prompt_tokens)? {
            lengths.push((ids.len(), i));
        }
    }
    lengths.sort_by_key(|&(n, _)| n);
    Ok(lengths.into_iter().map(|(_, i)| i).collect())
}

/// The prompt's tokens, or None when it has more than `max_prompt_tokens`. Only one token past
/// the cap is tokenized, so an enormous user message costs no more than a prompt that fits.
fn prompt_within(
    chat: &ChatTokenizer,
    messages: &[Message],
    max_prompt_tokens: usize,
) -> Result<Option<Vec<i64>>> {
    let head = chat.encode_prompt_head(messages, max_prompt_tokens.saturating_add(1))?;
    Ok((head.ids.len() <= max_prompt_tokens).then_some(head.ids))
}

/// Concatenate the part files into OUTPUT_FILE with the conversations in input order.
fn merge_in_input_order(
    out: &Path,
    batches: usize,
    conversations: &[Conversation],
) -> Result<usize> {
    let mut by_id = std::collections::HashMap::new();
    for k in 0..batches {
        let path = part_path(out, k);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        for line in text.lines() {
            let row: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{} is corrupt", path.display()))?;
            let id = row["id"].as_str().unwrap_or_default().to_string();
            by_id.insert(id, line.to_string());
        }
    }
    let mut all = String::new();
    for c in conversations {
        if let Some(line) = by_id.get(&c.id) {
            all += line;
            all.push('\n');
        }
    }
    atomic_write(&out.join(OUTPUT_FILE), all.as_bytes())?;
    Ok(by_id.len())
}

fn part_path(out: &Path, k: usize) -> PathBuf {
    out.join(format!("part-{k:05}.jsonl"))
}

/// The conversation without its assistant turns, keeping at most `max_turns` user turns.
fn user_turns(c: &Conversation, max_turns: Option<usize>) -> Vec<Message> {
    let mut kept = vec![];
    let mut users = 0;
    for m in c.messages.iter().filter(|m| m.role != Role::Assistant) {
        if m.role == Role::User {
            if users == max_turns.unwrap_or(usize::MAX) {
                break;
            }
            users += 1;
        }
        kept.push(m.clone());
    }
    kept
}

/// Answer every user turn of every conversation, turn by turn across the batch. Returns the
/// conversations with the teacher's answers interleaved, and the number of tokens generated.
fn answer_batch(
    teacher: &Teacher,
    chat: &ChatTokenizer,
    prompts: &[Vec<Message>],
    cfg: &GenerationConfig,
    max_prompt_tokens: usize,
) -> Result<(Vec<Vec<Message>>, usize)> {
    let mut histories: Vec<Vec<Message>> = vec![vec![]; prompts.len()];
    let mut cursors = vec![0usize; prompts.len()];
    let mut tokens = 0;
    loop {
        // Advance every conversation to its next user turn, collecting the prompts to answer.
        let mut rows = vec![];
        for (i, prompt) in prompts.iter().enumerate() {
            while cursors[i] < prompt.len() {
                let m = &prompt[cursors[i]];
                histories[i].push(m.clone());
                cursors[i] += 1;
                if m.role == Role::User {
                    rows.push(i);
                    break;
                }
            }
        }
        if rows.is_empty() {
            return Ok((histories, tokens));
        }
        let mut ids = vec![];
        let mut answered_rows = vec![];
        for i in rows {
            if let Some(prompt) = prompt_within(chat, &histories[i], max_prompt_tokens)? {
                ids.push(prompt);
                answered_rows.push(i);
            } else {
                // Too long to answer: the conversation ends with the previous answer.
                histories[i].pop();
                cursors[i] = prompts[i].len();
            }
        }
        let rows = answered_rows;
        let answers = generate_batch(teacher, &ids, cfg)?;
        for (&i, answer) in rows.iter().zip(answers) {
            tokens += answer.token_ids.len();
            let text = chat.decode(&answer.token_ids)?;
            histories[i].push(Message::new(Role::Assistant, text.trim().to_string()));
        }
    }
}

/// One ShareGPT JSONL line: {"id", "conversations": [{"from", "value"}]}.
fn sharegpt_line(id: &str, messages: &[Message]) -> Result<String> {
    let turns: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| {
            let from = match m.role {
                Role::System => "system",
                Role::User => "human",
                Role::Assistant => "gpt",
            };
            serde_json::json!({ "from": from, "value": m.content })
        })
        .collect();
    Ok(serde_json::to_string(&serde_json::json!({ "id": id, "conversations": turns }))? + "\n")
}
