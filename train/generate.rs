//! Plain (non-speculative) decoding with the teacher: greedy at temperature 0, otherwise sampling
//! from softmax(logits / T). Batched with left padding, so self-distillation can answer many
//! prompts at once; batch 1 is the `clover generate` path and the speed baseline of `clover eval`.

use crate::teacher::Teacher;
use anyhow::{ensure, Result};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub seed: u64,
    /// Generation of a row ends after one of these (the stop token is not returned).
    pub stop_ids: Vec<i64>,
}

/// One row's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub token_ids: Vec<i64>,
    /// True when a stop token ended the row, false when max_new_tokens did.
    pub stopped: bool,
}

/// Timings of a batch-1 generation, for tokens/s figures.
#[derive(Debug, Clone)]
pub struct Timed {
    pub answer: Answer,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Pick the next token of every row from last-position logits [B,V].
pub fn pick_next(logits: &Tensor, temperature: f64) -> Tensor {
    if temperature <= 0.0 {
        logits.argmax(-1, false)
    } else {
        (logits.to_kind(Kind::Float) / temperature)
            .softmax(-1, Kind::Float)
            .multinomial(1, false)
            .squeeze_dim(-1)
    }
}

/// Answer one prompt, timing prefill and decode separately.
pub fn generate(teacher: &Teacher, prompt: &[i64], cfg: &GenerationConfig) -> Result<Timed> {
    ensure!(!prompt.is_empty(), "cannot generate from an empty prompt");
    tch::manual_seed(cfg.seed as i64);
    tch::no_grad(|| {
        let device = teacher.device();
        let mut cache = teacher.new_cache(1);
        let start = Instant::now();
        let ids = Tensor::from_slice(prompt).unsqueeze(0).to_device(device);
        let positions = arange(0, prompt.len() as i64, device).unsqueeze(0);
        let u = teacher.forward(&ids, &positions, None, Some(&mut cache));
        let mut next = pick_next(&teacher.logits(&last_row(&u)), cfg.temperature);
        let mut token = next.int64_value(&[0]);
        let prefill_seconds = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let mut answer = Answer {
            token_ids: vec![],
            stopped: false,
        };
        loop {
            if cfg.stop_ids.contains(&token) {
                answer.stopped = true;
                break;
            }
            answer.token_ids.push(token);
            if answer.token_ids.len() >= cfg.max_new_tokens {
                break;
            }
            let pos = Tensor::from_slice(&[cache.len()])
                .unsqueeze(0)
                .to_device(device);
            let u = teacher.forward(&next.view([1, 1]), &pos, None, Some(&mut cache));
            next = pick_next(&teacher.logits(&last_row(&u)), cfg.temperature);
            token = next.int64_value(&[0]);
        }
        Ok(Timed {
            answer,
            prefill_seconds,
            decode_seconds: start.elapsed().as_secs_f64(),
        })
    })
}

/// Answer many prompts in one left-padded batch. Rows that stop early keep decoding padding
/// (masked out) until every row is done.
pub fn generate_batch(
    teacher: &Teacher,
    prompts: &[Vec<i64>],
    cfg: &GenerationConfig,
) -> Result<Vec<Answer>> {
    ensure!(
        prompts.iter().all(|p| !p.is_empty()),
        "cannot generate from an empty prompt"
    );
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    tch::manual_seed(cfg.seed as i64);
    tch::no_grad(|| {
        let device = teacher.device();
        let b = prompts.len() as i64;
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
        let (ids, valid) = left_pad(prompts, width, device);
        let positions = (valid.cumsum(1, Kind::Int64) - 1).clamp_min(0);
        let mut cache = teacher.new_cache(b);
        let mask = prefill_mask(&valid, device);
        let u = teacher.forward(&ids, &positions, Some(&mask), Some(&mut cache));
        let mut next = pick_next(&teacher.logits(&last_row(&u)), cfg.temperature);
        let mut last_pos = positions.select(1, width - 1);
        let mut valid = valid;
        let mut answers = vec![
            Answer {
                token_ids: vec![],
                stopped: false
            };
            prompts.len()
        ];
        let mut done = vec![false; prompts.len()];
        for _ in 0..cfg.max_new_tokens {
            let tokens: Vec<i64> = Vec::<i64>::try_from(&next.to_device(Device::Cpu))?;
            for (row, &tok) in tokens.iter().enumerate() {
                if done[row] {
                    continue;
                }
                if cfg.stop_ids.contains(&tok) {
                    answers[row].stopped = true;
                    done[row] = true;
                } else {
                    answers[row].token_ids.push(tok);
                    done[row] = answers[row].token_ids.len() >= cfg.max_new_tokens;
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            valid = Tensor::cat(&[valid, Tensor::ones([b, 1], (Kind::Bool, device))], 1);
            last_pos = last_pos + 1;
            let mask = valid.view([b, 1, 1, -1]);
            let u = teacher.forward(
                &next.view([b, 1]),
                &last_pos.view([b, 1]),
                Some(&mask),
                Some(&mut cache),
            );
            next = pick_next(&teacher.logits(&last_row(&u)), cfg.temperature);
        }
        Ok(answers)
    })
}

fn arange(start: i64, end: i64, device: Device) -> Tensor {
    Tensor::arange_start(start, end, (Kind::Int64, device))
}

/// The last position of [B,S,H] as [B,H].
fn last_row(u: &Tensor) -> Tensor {
    let s = u.size()[1];
    u.select(1, s - 1)
}

/// Left-pad prompts to `width`: ids [B,W] (padding id 0) and a validity mask [B,W].
fn left_pad(prompts: &[Vec<i64>], width: i64, device: Device) -> (Tensor, Tensor) {
    let mut ids = Vec::with_capacity(prompts.len() * width as usize);
    let mut valid = Vec::with_capacity(ids.capacity());
    for p in prompts {
        let pad = width as usize - p.len();
        ids.extend(std::iter::repeat_n(0i64, pad).chain(p.iter().copied()));
        valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
    }
    let b = prompts.len() as i64;
    (
        Tensor::from_slice(&ids).view([b, width]).to_device(device),
        Tensor::from_slice(&valid)
            .view([b, width])
            .to_device(device),
    )
}

/// Causal attention over real tokens only. Padding rows attend to themselves, so no row of the
/// mask is empty (an all-masked row would make attention NaN and poison the cache).
fn prefill_mask(valid: &Tensor, device: Device) -> Tensor {
    let (b, w) = (valid.size()[0], valid.size()[1]);
    let causal = crate::teacher::causal_mask(0, w, device);
    let keys = valid.view([b, 1, 1, w]);
    let eye = Tensor::eye(w, (Kind::Bool, device)).view([1, 1, w, w]);
    causal.logical_and(&keys).logical_or(&eye)
}

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
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub run_on: crate::teacher::RunOn,
    /// Print one JSON object {"text", "token_ids", "tokens_per_s"} instead of the text.
    #[arg(long)]
    pub json: bool,
    /// Exported Clover-2 draft head: decode speculatively with it and report tau.
    #[arg(long)]
    pub draft: Option<std::path::PathBuf>,
    /// Speculation tree with --draft: "mc_sim_7b_63" (default) or a JSON file with a list of paths.
    #[arg(long)]
    pub tree: Option<String>,
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let (device, kind) = args.run_on.resolve()?;
    let teacher = Teacher::load(&args.model, device, kind)?;
    // Without --chat no template is rendered; naming a built-in one keeps a model that has no
    // chat_template of its own usable for plain completion.
    let template = if args.chat { None } else { Some("chatml") };
    let chat = crate::chat::ChatTokenizer::from_model_dir(&args.model, template)?;
    let (prompt, stop_ids) = if args.chat {
        let messages = [crate::chat::Message::new(
            crate::chat::Role::User,
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
            let head = crate::speculative::load_head(dir, &teacher)?;
            let tree = crate::tree::Tree::load(args.tree.as_deref())?;
            let sampling = crate::speculative::Sampling {
                temperature: cfg.temperature,
                seed: cfg.seed as i64,
            };
            let (timed, stats) = crate::speculative::generate_speculative(
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
