//! Plain (non-speculative) decoding with the teacher: greedy at temperature 0, otherwise sampling
//! from softmax(logits / T). Batched with left padding, so self-distillation can answer many
//! prompts at once; batch 1 is the `clover generate` path and the speed baseline of `clover eval`.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::decode::sampling::{check_context, pick_next, Answer, Timed};
use crate::model::teacher::Teacher;

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub seed: u64,
    /// Generation of a row ends after one of these (the stop token is not returned).
    pub stop_ids: Vec<i64>,
}

/// Answer one prompt, timing prefill and decode separately.
pub fn generate(teacher: &Teacher, prompt: &[i64], cfg: &GenerationConfig) -> Result<Timed> {
    ensure!(!prompt.is_empty(), "cannot generate from an empty prompt");
    teacher.check_token_ids(prompt).context("the prompt")?;
    check_context(
        prompt.len(),
        cfg.max_new_tokens,
        teacher.config.max_position_embeddings,
    )?;
    crate::rng::seeded_if(cfg.temperature > 0.0, cfg.seed as i64, || {
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
    for (i, p) in prompts.iter().enumerate() {
        teacher
            .check_token_ids(p)
            .with_context(|| format!("prompt {i}"))?;
        check_context(
            p.len(),
            cfg.max_new_tokens,
            teacher.config.max_position_embeddings,
        )?;
    }
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    crate::rng::seeded_if(cfg.temperature > 0.0, cfg.seed as i64, || {
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
    let causal = crate::model::layers::causal_mask(0, w, device);
    let keys = valid.view([b, 1, 1, w]);
    let eye = Tensor::eye(w, (Kind::Bool, device)).view([1, 1, w, w]);
    causal.logical_and(&keys).logical_or(&eye)
}
