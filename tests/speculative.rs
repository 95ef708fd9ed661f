//! Speculative decoding: lossless greedy output, lossless sampling (chi-square), KV compaction.
use crate::common::{scratch_dir, Scratch};
use clover::decode::drafter::unroll::draft_topk;
use clover::decode::drafter::{Drafter, HeadDrafter};
use clover::decode::dynamic::DynamicTree;
use clover::decode::generate::{generate, GenerationConfig};
use clover::decode::sampling::Sampling;
use clover::decode::speculative::{
    generate_speculative, generate_with_drafter, generate_with_mode,
};
use clover::decode::tree::Tree;
use clover::decode::tree_policy::TreeMode;
use clover::decode::verify::{accept_greedy, accept_sampling, VerifyPlan};
use clover::model::head::DraftHead;
use clover::model::head_config::HeadConfig;
use clover::model::teacher::Teacher;
use clover::training::run_dir::Start;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A random LLaMA written into a scratch dir (config.json + model.safetensors, untied lm_head),
/// removed when the returned guard drops.
/// `logit_scale` sets the std of the logits: large = peaked (no near-ties for greedy tests),
/// about 1 = high-entropy (sampling tests).
pub fn tiny_llama(tag: &str, vocab: i64, logit_scale: f64, seed: i64) -> Scratch {
    let dir = scratch_dir("spec", tag);
    let (h, inter, layers, heads, kv, hd) = (32i64, 64i64, 2, 4i64, 2i64, 8i64);
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": hd, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "max_position_embeddings": 512, "eos_token_id": 1,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let _rng = clover::rng::hold(seed);
    let w = |shape: &[i64], std: f64| Tensor::randn(shape, (Kind::Float, Device::Cpu)) * std;
    let inv = 1.0 / (h as f64).sqrt();
    let mut tensors: Vec<(String, Tensor)> = vec![
        ("model.embed_tokens.weight".into(), w(&[vocab, h], 1.0)),
        ("lm_head.weight".into(), w(&[vocab, h], logit_scale * inv)),
        (
            "model.norm.weight".into(),
            Tensor::ones([h], (Kind::Float, Device::Cpu)),
        ),
    ];
    for l in 0..layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        tensors.push((p("self_attn.q_proj.weight"), w(&[heads * hd, h], inv)));
        tensors.push((p("self_attn.k_proj.weight"), w(&[kv * hd, h], inv)));
        tensors.push((p("self_attn.v_proj.weight"), w(&[kv * hd, h], inv)));
        tensors.push((p("self_attn.o_proj.weight"), w(&[h, heads * hd], inv)));
        tensors.push((p("mlp.gate_proj.weight"), w(&[inter, h], inv)));
        tensors.push((p("mlp.up_proj.weight"), w(&[inter, h], inv)));
        tensors.push((
            p("mlp.down_proj.weight"),
            w(&[h, inter], 1.0 / (inter as f64).sqrt()),
        ));
        tensors.push((
            p("input_layernorm.weight"),
            Tensor::ones([h], (Kind::Float, Device::Cpu)),
        ));
        tensors.push((
            p("post_attention_layernorm.weight"),
            Tensor::ones([h], (Kind::Float, Device::Cpu)),
        ));
    }
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
    dir
}

/// Plain greedy decoding (the baseline implementation of `clover generate` / `clover eval`).
pub fn plain_greedy(
    teacher: &Teacher,
    prompt: &[i64],
    max_new: usize,
    stop_ids: &[i64],
) -> Vec<i64> {
    let cfg = GenerationConfig {
        max_new_tokens: max_new,
        temperature: 0.0,
        seed: 0,
        stop_ids: stop_ids.to_vec(),
    };
    generate(teacher, prompt, &cfg).unwrap().answer.token_ids
}

/// Greedy speculative decoding with `head` (and a sliced draft vocabulary) in `mode`: the answer.
pub fn greedy_with_mode(
    teacher: &Teacher,
    head: &DraftHead,
    vocab: Option<&clover::decode::drafter::DraftVocab>,
    mode: TreeMode,
    prompt: &[i64],
    (max_new, stop_ids): (usize, &[i64]),
) -> Vec<i64> {
    let mut drafter = HeadDrafter::new(head).with_vocab(vocab);
    let (spec, _) = generate_with_mode(
        teacher,
        &mut drafter,
        mode,
        prompt,
        max_new,
        Sampling::greedy(),
        stop_ids,
    )
    .unwrap();
    spec.answer.token_ids
}

/// The SmolLM2 tests' chat prompt (one user turn, SmolLM2's own template) and stop ids.
pub fn smollm2_chat_prompt(dir: &Path) -> (Vec<i64>, Vec<i64>) {
    let chat = clover::formats::chat::ChatTokenizer::from_model_dir(dir, None).unwrap();
    let messages = [clover::formats::chat::Message::new(
        clover::formats::chat::Role::User,
        "Name three primary colors and explain why they are called primary.".to_string(),
    )];
    (chat.encode_prompt(&messages).unwrap(), chat.stop_ids())
}

pub fn load(dir: &Path) -> Teacher {
    Teacher::load(dir, Device::Cpu, Kind::Float).unwrap()
}

/// Logits after `seq` for a batch of equal-length sequences [B,S] -> [B,V], no cache.
fn last_logits(teacher: &Teacher, seqs: &Tensor) -> Tensor {
    let (b, s) = (seqs.size()[0], seqs.size()[1]);
    let pos = Tensor::arange(s, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .expand([b, s], true);
    let u = teacher.forward(seqs, &pos, None, None);
    teacher.logits(&u.select(1, -1))
}

/// A drafter that asks the teacher itself (plus Gaussian noise on the logits), so drafts are
/// often right and the tree is accepted at every depth. Its "state" is the drafted path so far,
/// as token ids stored in a float tensor [n, 8] padded with -1.
pub struct NoisyOracle<'a> {
    pub teacher: &'a Teacher,
    pub first: i64,
    pub seq: Vec<i64>,
    pub noise: f64,
}

impl NoisyOracle<'_> {
    fn noisy(&self, logits: Tensor) -> Tensor {
        &logits + logits.randn_like() * self.noise
    }
}

impl Drafter for NoisyOracle<'_> {
    fn reset(&mut self) {
        self.seq = vec![self.first];
    }
    fn extend(&mut self, _u: &Tensor, next_ids: &Tensor) -> anyhow::Result<(Tensor, Tensor)> {
        self.seq
            .extend(Vec::<i64>::try_from(next_ids.view([-1])).unwrap());
        let logits = last_logits(self.teacher, &Tensor::from_slice(&self.seq).unsqueeze(0));
        Ok((
            self.noisy(logits),
            Tensor::full([1, 8], -1.0, (Kind::Float, Device::Cpu)),
        ))
    }
    fn step(&mut self, states: &Tensor, tokens: &Tensor) -> anyhow::Result<(Tensor, Tensor)> {
        let n = states.size()[0];
        let depth = states
            .ge(0.0)
            .sum_dim_intlist(1, false, Kind::Int64)
            .int64_value(&[0]);
        let new_states = states.copy();
        new_states
            .select(1, depth)
            .copy_(&tokens.to_kind(Kind::Float));
        let path = new_states.narrow(1, 0, depth + 1).to_kind(Kind::Int64);
        let prefix = Tensor::from_slice(&self.seq)
            .unsqueeze(0)
            .expand([n, self.seq.len() as i64], true);
        let logits = last_logits(self.teacher, &Tensor::cat(&[prefix, path], 1));
        Ok((self.noisy(logits), new_states))
    }
}

/// A cheap bigram drafter: logits = table[last token]. Its "state" is that token.
pub struct BigramDrafter {
    pub table: Tensor,
}

impl Drafter for BigramDrafter {
    fn reset(&mut self) {}
    fn extend(&mut self, _u: &Tensor, next_ids: &Tensor) -> anyhow::Result<(Tensor, Tensor)> {
        let last = next_ids
            .view([-1])
            .narrow(0, next_ids.numel() as i64 - 1, 1);
        Ok((
            self.table.index_select(0, &last),
            last.to_kind(Kind::Float).unsqueeze(1),
        ))
    }
    fn step(&mut self, _states: &Tensor, tokens: &Tensor) -> anyhow::Result<(Tensor, Tensor)> {
        Ok((
            self.table.index_select(0, tokens),
            tokens.to_kind(Kind::Float).unsqueeze(1),
        ))
    }
}

fn oracle<'a>(teacher: &'a Teacher, prompt: &[i64], noise: f64) -> NoisyOracle<'a> {
    NoisyOracle {
        teacher,
        first: prompt[0],
        seq: vec![],
        noise,
    }
}

#[test]
fn greedy_speculative_equals_plain_with_noisy_oracle() {
    let dir = tiny_llama("greedy", 96, 4.0, 11);
    let teacher = load(&dir);
    let tree = Tree::default_tree();
    for (i, prompt) in [
        vec![3i64, 17, 42, 5, 60],
        vec![7i64],
        vec![9i64, 9, 9, 30, 31, 32, 33],
    ]
    .iter()
    .enumerate()
    {
        let _rng = clover::rng::hold(100 + i as i64);
        let plain = plain_greedy(&teacher, prompt, 48, &[]);
        let mut drafter = oracle(&teacher, prompt, 1.5);
        let (spec, stats) = generate_with_drafter(
            &teacher,
            &mut drafter,
            &tree,
            prompt,
            48,
            Sampling::greedy(),
            &[],
        )
        .unwrap();
        assert_eq!(spec.answer.token_ids, plain, "prompt {i}");
        assert_eq!(plain.len(), 48);
        // The oracle must have driven acceptance past the first path and depth for this test to
        // cover compaction of non-trivial paths.
        assert!(
            stats.tau() > 2.0,
            "tau {} too low to exercise the tree",
            stats.tau()
        );
        assert!(
            stats.accepted.iter().any(|&a| a >= 3),
            "{:?}",
            stats.accepted
        );
        eprintln!(
            "prompt {i}: tau {:.2}, accepted {:?}",
            stats.tau(),
            stats.accepted
        );
    }
}

#[test]
fn greedy_speculative_stops_where_plain_stops() {
    let dir = tiny_llama("stops", 96, 4.0, 12);
    let teacher = load(&dir);
    let tree = Tree::default_tree();
    let prompt = [4i64, 8, 15, 16, 23, 42];
    let plain = plain_greedy(&teacher, &prompt, 40, &[]);
    let stop = plain[12];
    let plain_stopped = plain_greedy(&teacher, &prompt, 40, &[stop]);
    let first = plain.iter().position(|&t| t == stop).unwrap();
    assert_eq!(plain_stopped, plain[..first].to_vec());
    let mut drafter = oracle(&teacher, &prompt, 0.5);
    let (spec, _) = generate_with_drafter(
        &teacher,
        &mut drafter,
        &tree,
        &prompt,
        40,
        Sampling::greedy(),
        &[stop],
    )
    .unwrap();
    assert!(spec.answer.stopped);
    assert_eq!(spec.answer.token_ids, plain_stopped);
    // max_new cut inside an accepted path
    let mut drafter = oracle(&teacher, &prompt, 0.0);
    let (spec, _) = generate_with_drafter(
        &teacher,
        &mut drafter,
        &tree,
        &prompt,
        7,
        Sampling::greedy(),
        &[],
    )
    .unwrap();
    assert!(!spec.answer.stopped);
    assert_eq!(spec.answer.token_ids, plain[..7].to_vec());
}

#[test]
fn accept_greedy_takes_the_longest_path_first_on_ties() {
    let tree = Tree::from_paths(&[vec![0], vec![1], vec![0, 0], vec![1, 0]], 2).unwrap();
    // nodes: 0 root, 1 [0], 2 [1], 3 [0,0], 4 [1,0]
    let plan = VerifyPlan::new(&tree, Device::Cpu);
    let tokens = Tensor::from_slice(&[5i64, 1, 2, 3, 4]);
    let logits_for = |argmax: [i64; 5]| {
        let l = Tensor::zeros([5, 8], (Kind::Float, Device::Cpu));
        for (i, a) in argmax.iter().enumerate() {
            let _ = l.get(i as i64).get(*a).fill_(1.0);
        }
        l
    };
    // Root predicts 2 (node 2), node 2 predicts 4 (node 4), node 4 predicts 7 -> bonus 7.
    let a = accept_greedy(&plan, &tokens, &logits_for([2, 0, 4, 0, 7])).unwrap();
    assert_eq!(
        (a.nodes, a.tokens, a.bonus),
        (vec![0, 2, 4], vec![5, 2, 4], 7)
    );
    // Nothing matches: only the root, bonus = root's argmax.
    let a = accept_greedy(&plan, &tokens, &logits_for([6, 0, 0, 0, 0])).unwrap();
    assert_eq!((a.nodes, a.bonus), (vec![0], 6));
    // Both depth-1 nodes would match if tokens were equal: make both children of the root token 1,
    // so the paths tie at length 1 and the first path in retrieve order wins.
    let tied = Tensor::from_slice(&[5i64, 1, 1, 3, 4]);
    let a = accept_greedy(&plan, &tied, &logits_for([1, 0, 0, 0, 0])).unwrap();
    assert_eq!((a.nodes, a.bonus), (vec![0, 1], 0));
}

/// Upper critical value of chi-square(df) at p = 0.001 (Wilson-Hilferty approximation).
fn chi2_critical(df: usize) -> f64 {
    let k = df as f64;
    let z = 3.09;
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

/// Pearson chi-square of observed counts against expected probabilities, pooling categories with
/// expected count < 5 into one bin. Returns (statistic, degrees of freedom).
fn chi_square(counts: &[usize], expected: &[f64]) -> (f64, usize) {
    let n: usize = counts.iter().sum();
    let (mut stat, mut bins) = (0.0, 0usize);
    let (mut pooled_o, mut pooled_e) = (0.0, 0.0);
    for (&c, &p) in counts.iter().zip(expected) {
        let e = p * n as f64;
        if e < 5.0 {
            pooled_o += c as f64;
            pooled_e += e;
        } else {
            stat += (c as f64 - e).powi(2) / e;
            bins += 1;
        }
    }
    if pooled_e > 0.0 {
        stat += (pooled_o - pooled_e).powi(2) / pooled_e.max(1e-9);
        bins += 1;
    }
    (stat, bins - 1)
}

/// A fixed random "true model" over a vocab of V: p(. | path) as a softmax of a table hashed by the
/// last two tokens, and a different draft model q the same way. Deterministic functions of the path.
struct ToyModels {
    p_table: Tensor,
    q_table: Tensor,
}

impl ToyModels {
    fn new(v: i64) -> Self {
        let _rng = clover::rng::hold(7);
        let p_table = (Tensor::randn([v + 1, v + 1, v], (Kind::Float, Device::Cpu)) * 1.2)
            .softmax(-1, Kind::Float);
        // The draft is the truth mixed with noise: often right, often wrong.
        let noise =
            Tensor::randn([v + 1, v + 1, v], (Kind::Float, Device::Cpu)).softmax(-1, Kind::Float);
        let q_table = &p_table * 0.5 + noise * 0.5;
        Self { p_table, q_table }
    }
    fn row(table: &Tensor, path: &[i64], v: i64) -> Tensor {
        let a = if path.len() >= 2 {
            path[path.len() - 2]
        } else {
            v
        };
        let b = path.last().copied().unwrap_or(v);
        table.get(a).get(b)
    }
}

/// Drive `accept_sampling` directly: draft a small tree from q (without replacement), verify
/// against p, and record the first two committed tokens. Their joint law must be exactly
/// p(x1 | root) p(x2 | root, x1).
#[test]
fn tree_sampling_acceptance_is_lossless() {
    tree_sampling_is_lossless_on(Device::Cpu);
}

/// Draws through `draft_topk` and `accept_sampling` on `device` (the toy tables live on the CPU)
/// and checks the first two committed tokens against the target's joint distribution.
pub(crate) fn tree_sampling_is_lossless_on(device: Device) {
    tch::set_num_threads(1);
    let v = 5i64;
    let toy = ToyModels::new(v);
    let tree = Tree::from_paths(
        &[
            vec![0],
            vec![1],
            vec![2],
            vec![0, 0],
            vec![0, 1],
            vec![1, 0],
            vec![0, 0, 0],
        ],
        3,
    )
    .unwrap();
    let plan = VerifyPlan::new(&tree, device);
    let sampling = Sampling {
        temperature: 1.0,
        seed: 0,
    };
    let _rng = clover::rng::hold(2024);
    let root = 0i64;
    let n_samples = 6000;
    let mut counts = vec![0usize; (v * v) as usize];
    let mut depth_hits = [0usize; 4];
    for _ in 0..n_samples {
        // Draft rows in draft-row order: q at the root, then at each internal node.
        let mut node_tokens = vec![root; tree.len()];
        let mut q_rows: Vec<Tensor> = (0..tree.n_draft_rows())
            .map(|_| Tensor::zeros([v], (Kind::Float, device)))
            .collect();
        for node in 0..tree.len() {
            let Some(row) = tree.draft_rows[node] else {
                continue;
            };
            let path: Vec<i64> = tree
                .ancestry(node)
                .iter()
                .map(|&a| node_tokens[a])
                .collect();
            let q = ToyModels::row(&toy.q_table, &path, v).to_device(device);
            // draft_topk at T = 1 draws from softmax(log q) = q.
            let (drawn, _) = draft_topk(&q.log().unsqueeze(0), tree.top_k, &sampling);
            let drawn = Vec::<i64>::try_from(drawn.view([-1]).to_device(Device::Cpu)).unwrap();
            for (rank, &child) in tree.children[node].iter().enumerate() {
                node_tokens[child] = drawn[rank];
            }
            q_rows[row] = q;
        }
        let p_rows: Vec<Tensor> = (0..tree.len())
            .map(|node| {
                let path: Vec<i64> = tree
                    .ancestry(node)
                    .iter()
                    .map(|&a| node_tokens[a])
                    .collect();
                ToyModels::row(&toy.p_table, &path, v).to_device(device)
            })
            .collect();
        let acc = accept_sampling(
            &plan,
            &Tensor::from_slice(&node_tokens).to_device(device),
            &Tensor::stack(&p_rows, 0),
            &Tensor::stack(&q_rows, 0),
        )
        .unwrap();
        depth_hits[acc.nodes.len() - 1] += 1;
        let mut out: Vec<i64> = acc.tokens[1..].to_vec();
        out.push(acc.bonus);
        if out.len() < 2 {
            // Nothing accepted: the next step would draw x2 from p(. | root, x1).
            let p2 = ToyModels::row(&toy.p_table, &[root, out[0]], v);
            out.push(p2.multinomial(1, true).int64_value(&[0]));
        }
        counts[(out[0] * v + out[1]) as usize] += 1;
    }
    let p1 = ToyModels::row(&toy.p_table, &[root], v);
    let expected: Vec<f64> = (0..v * v)
        .map(|i| {
            let (a, b) = (i / v, i % v);
            p1.double_value(&[a]) * ToyModels::row(&toy.p_table, &[root, a], v).double_value(&[b])
        })
        .collect();
    let (stat, df) = chi_square(&counts, &expected);
    eprintln!(
        "chi2 {stat:.1} df {df} (crit {:.1}); accepted-length histogram {depth_hits:?}",
        chi2_critical(df)
    );
    assert!(
        depth_hits[0] > 100 && depth_hits[1] > 100 && depth_hits[2] + depth_hits[3] > 100,
        "{depth_hits:?}"
    );
    assert!(
        stat < chi2_critical(df),
        "chi-square {stat} over {df} dof: sampler is not lossless"
    );
}

/// The same test must FAIL for a lossy variant, or it proves nothing: here the bonus after a fully
/// rejected node is drawn from p instead of the residual (a classic mistake).
#[test]
fn chi_square_detects_a_lossy_sampler() {
    let v = 5i64;
    let toy = ToyModels::new(v);
    let p1 = ToyModels::row(&toy.p_table, &[0], v);
    let q = ToyModels::row(&toy.q_table, &[0], v);
    let _rng = clover::rng::hold(5);
    let mut counts = vec![0usize; v as usize];
    for _ in 0..6000 {
        let x = q.multinomial(1, true).int64_value(&[0]);
        let ratio = p1.double_value(&[x]) / q.double_value(&[x]);
        let u = Tensor::rand([1], (Kind::Float, Device::Cpu)).double_value(&[0]);
        let tok = if u < ratio {
            x
        } else {
            p1.multinomial(1, true).int64_value(&[0])
        };
        counts[tok as usize] += 1;
    }
    let expected: Vec<f64> = (0..v).map(|i| p1.double_value(&[i])).collect();
    let (stat, df) = chi_square(&counts, &expected);
    assert!(
        stat > chi2_critical(df),
        "lossy sampler passed: chi2 {stat}"
    );
}

/// End to end on a tiny V=12 model (top-k 10 needs V >= 10): speculative sampling's first two tokens (root from the prefill,
/// then the first verification step) follow the teacher's joint law.
#[test]
fn speculative_sampling_end_to_end_first_tokens() {
    // Thousands of tiny ops: intra-op threads only add contention here (30x slower on 2 cores).
    tch::set_num_threads(1);
    let v = 12i64;
    let dir = tiny_llama("e2e", v, 1.5, 21);
    let teacher = load(&dir);
    let tree = Tree::default_tree();
    let prompt = [3i64, 9, 4];
    let temperature = 0.8;
    // Exact joint of (x1, x2) at temperature T.
    let (p1, p2) = tch::no_grad(|| {
        let seq = Tensor::from_slice(&prompt).unsqueeze(0);
        let p1 = (last_logits(&teacher, &seq) / temperature)
            .softmax(-1, Kind::Float)
            .view([-1]);
        let seqs = Tensor::cat(
            &[
                seq.expand([v, 3], true),
                Tensor::arange(v, (Kind::Int64, Device::Cpu)).unsqueeze(1),
            ],
            1,
        );
        let p2 = (last_logits(&teacher, &seqs) / temperature).softmax(-1, Kind::Float);
        (p1, p2)
    });
    let expected: Vec<f64> =
        Vec::<f64>::try_from((p1.unsqueeze(1) * p2).view([-1]).to_kind(Kind::Double)).unwrap();
    let mut counts = vec![0usize; (v * v) as usize];
    let n = 1500;
    // A bigram draft built from the teacher's own next-token logits after each single token, plus
    // noise: close enough to be accepted often, different enough to be rejected often.
    let _rng = clover::rng::hold(99);
    let table = tch::no_grad(|| {
        let singles = Tensor::arange(v, (Kind::Int64, Device::Cpu)).unsqueeze(1);
        let l = last_logits(&teacher, &singles);
        &l + l.randn_like()
    });
    let mut drafter = BigramDrafter { table };
    for i in 0..n {
        let sampling = Sampling {
            temperature,
            seed: 1000 + i,
        };
        let (out, _) =
            generate_with_drafter(&teacher, &mut drafter, &tree, &prompt, 2, sampling, &[])
                .unwrap();
        let t = &out.answer.token_ids;
        counts[(t[0] * v + t[1]) as usize] += 1;
    }
    let (stat, df) = chi_square(&counts, &expected);
    eprintln!(
        "end-to-end chi2 {stat:.1} df {df} (crit {:.1})",
        chi2_critical(df)
    );
    assert!(stat < chi2_critical(df), "chi-square {stat} over {df} dof");
}

/// Sampling with an exact oracle (q = p) accepts everything, and output still has the right length.
#[test]
fn speculative_sampling_with_exact_draft_accepts_full_depth() {
    let dir = tiny_llama("exact", 32, 1.5, 22);
    let teacher = load(&dir);
    let tree = Tree::default_tree();
    let prompt = [5i64, 6, 7];
    let mut drafter = oracle(&teacher, &prompt, 0.0);
    let sampling = Sampling {
        temperature: 1.0,
        seed: 3,
    };
    let (out, stats) =
        generate_with_drafter(&teacher, &mut drafter, &tree, &prompt, 30, sampling, &[]).unwrap();
    assert_eq!(out.answer.token_ids.len(), 30);
    // With q = p every acceptance ratio is 1 (up to rounding), so each step takes a full path.
    let full = stats
        .accepted
        .iter()
        .filter(|&&a| a == tree.max_depth())
        .count();
    assert!(full + 1 >= stats.steps(), "{:?}", stats.accepted);
}

/// After a tree forward and compaction to an accepted path, the cache equals one built by a plain
/// forward over the accepted sequence: the next token's hidden state matches a fresh full forward.
#[test]
fn kv_compaction_matches_fresh_forward() {
    let dir = tiny_llama("compact", 64, 2.0, 23);
    let teacher = load(&dir);
    let tree = Tree::default_tree();
    let plan = VerifyPlan::new(&tree, Device::Cpu);
    let prefix = [2i64, 40, 41, 7, 9];
    let _g = tch::no_grad_guard();
    let mut cache = teacher.new_cache(1);
    let l = prefix.len() as i64;
    let pos = Tensor::arange(l, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let _ = teacher.forward(
        &Tensor::from_slice(&prefix).unsqueeze(0),
        &pos,
        None,
        Some(&mut cache),
    );
    let tree_tokens = Tensor::randint(64, [tree.len() as i64], (Kind::Int64, Device::Cpu));
    let positions = (&plan.tensors.position_ids + l).unsqueeze(0);
    let _ = teacher.forward(
        &tree_tokens.unsqueeze(0),
        &positions,
        Some(&plan.tensors.verify_mask(l)),
        Some(&mut cache),
    );
    assert_eq!(cache.len(), l + tree.len() as i64);
    // Accept the path root -> [1] -> [1,0] -> [1,0,0] (nodes 0, 2, 8, 20): not a prefix of the tree.
    let nodes = [0i64, 2, 8, 20];
    cache.compact(l, &(Tensor::from_slice(&nodes) + l));
    assert_eq!(cache.len(), l + 4);
    let next = 33i64;
    let u_next = teacher.forward(
        &Tensor::from_slice(&[next]).unsqueeze(0),
        &Tensor::from_slice(&[l + 4]).unsqueeze(0),
        None,
        Some(&mut cache),
    );
    let tt = Vec::<i64>::try_from(&tree_tokens).unwrap();
    let mut seq = prefix.to_vec();
    seq.extend(nodes.iter().map(|&i| tt[i as usize]));
    seq.push(next);
    let pos = Tensor::arange(seq.len() as i64, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let full = teacher.forward(&Tensor::from_slice(&seq).unsqueeze(0), &pos, None, None);
    let d = (u_next.select(1, 0) - full.select(1, -1))
        .abs()
        .max()
        .double_value(&[]);
    // Covers the f32 paths bound 2·(64 + 64)·2^-24·|u| ≈ 8e-5 at |u| ≈ 5 (MLP 64, 2 layers).
    assert!(
        d < 1e-4,
        "compacted cache differs from a fresh forward by {d}"
    );
}

fn random_head(teacher: &Teacher, seed: i64) -> DraftHead {
    DraftHead::new(teacher, HeadConfig::from_teacher(&teacher.config), seed).unwrap()
}

#[test]
fn greedy_speculative_equals_plain_with_random_head_tiny() {
    let dir = tiny_llama("head", 96, 4.0, 31);
    let teacher = load(&dir);
    let head = random_head(&teacher, 5);
    let tree = Tree::default_tree();
    for prompt in [vec![3i64, 17, 42, 5, 60, 61, 62], vec![11i64, 12]] {
        let plain = plain_greedy(&teacher, &prompt, 40, &[]);
        let (spec, stats) =
            generate_speculative(&teacher, &head, &tree, &prompt, 40, Sampling::greedy(), &[])
                .unwrap();
        assert_eq!(spec.answer.token_ids, plain);
        assert!(stats.steps() >= 1 && stats.steps() <= 40);
    }
}

/// The real SmolLM2-135M teacher with a randomly initialised head (reference init): greedy
/// speculative output equals plain greedy token for token.
#[test]
fn greedy_speculative_equals_plain_smollm2_random_head() {
    tch::set_num_threads(1);
    let dir = crate::common::smollm2_dir();
    let teacher = load(&dir);
    let head = random_head(&teacher, 1);
    let tree = Tree::default_tree();
    let (prompt, stop) = crate::speculative::smollm2_chat_prompt(&dir);
    let plain = plain_greedy(&teacher, &prompt, 40, &stop);
    let (spec, stats) = generate_speculative(
        &teacher,
        &head,
        &tree,
        &prompt,
        40,
        Sampling::greedy(),
        &stop,
    )
    .unwrap();
    eprintln!(
        "SmolLM2 random head: {} tokens, tau {:.2}, accepted {:?}",
        spec.answer.token_ids.len(),
        stats.tau(),
        stats.accepted
    );
    assert_eq!(spec.answer.token_ids, plain);
    assert!(
        plain.len() >= 20,
        "answer too short to be a meaningful test"
    );
}

/// A head trained (online, a few dozen steps) on the tiny teacher's own greedy continuations:
/// it must accept drafts more often than an untrained head, and greedy speculative output must
/// still equal plain greedy token for token.
#[test]
fn greedy_speculative_equals_plain_with_trained_head_tiny() {
    tch::set_num_threads(1);
    let dir = tiny_llama("trained", 96, 4.0, 31);
    let teacher = load(&dir);
    let prompts: Vec<Vec<i64>> = (0..40i64)
        .map(|i| vec![2 + i % 90, 3 + (i * 7) % 90, 4 + (i * 13) % 90])
        .collect();
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        temperature: 0.0,
        seed: 0,
        stop_ids: vec![],
    };
    let answers = clover::decode::generate::generate_batch(&teacher, &prompts, &cfg).unwrap();
    let samples: Vec<clover::data::shards::Sample> = prompts
        .iter()
        .zip(&answers)
        .enumerate()
        .map(|(i, (p, a))| {
            let input_ids: Vec<i64> = p.iter().chain(&a.token_ids).copied().collect();
            let loss_mask = (0..input_ids.len())
                .map(|j| u8::from(j >= p.len()))
                .collect();
            clover::data::shards::Sample {
                id: format!("s{i}"),
                input_ids,
                loss_mask,
            }
        })
        .collect();
    let out = scratch_dir("spec", "trained-out");
    let toml = format!(
        "model_dir = \"{}\"\ndata_dir = \"unused\"\nout_dir = \"{}\"\ndevice = \"cpu\"\n\
         max_steps = 60\nbatch_tokens = 256\nbucket_window = 8\nwarmup_steps = 5\n\
         eval_every = 0\nsave_every = 1000\nkeep_last = 1\neval_samples = 4\nseed = 3\nprogress = false\n",
        dir.display(),
        out.display()
    );
    let train_cfg =
        clover::training::config::TrainConfig::from_toml(&toml, "trained-tiny").unwrap();
    let outcome = clover::training::trainer::train(
        &train_cfg,
        &teacher,
        clover::training::trainer::Source::Online(samples),
        vec![],
        Start::Fresh,
        &clover::training::config::TrainOptions::default(),
        None,
    )
    .unwrap();
    let ck = outcome
        .last_checkpoint
        .expect("training writes a final checkpoint");
    let (head_cfg, tensors) = clover::training::checkpoint::read_checkpoint_head(&ck).unwrap();
    let trained = DraftHead::from_tensors(&teacher, head_cfg, &tensors).unwrap();
    let untrained = random_head(&teacher, 3);
    let tree = Tree::default_tree();
    let (mut tau_trained, mut tau_untrained) = (0.0, 0.0);
    for i in 0..4i64 {
        let prompt = vec![5 + i * 11, 40 + i, 77 - i];
        let plain = plain_greedy(&teacher, &prompt, 32, &[]);
        for (head, tau) in [
            (&trained, &mut tau_trained),
            (&untrained, &mut tau_untrained),
        ] {
            let (spec, stats) =
                generate_speculative(&teacher, head, &tree, &prompt, 32, Sampling::greedy(), &[])
                    .unwrap();
            assert_eq!(spec.answer.token_ids, plain, "prompt {prompt:?}");
            *tau += stats.tau() / 4.0;
        }
    }
    eprintln!("tiny teacher: tau trained {tau_trained:.2}, untrained {tau_untrained:.2}");
    assert!(
        tau_trained > tau_untrained + 0.2,
        "training did not raise tau: {tau_trained:.2} vs {tau_untrained:.2}"
    );
}

/// A dynamic tree (EAGLE-2) driven deep by the noisy oracle: greedy output equals plain greedy,
/// and at the same number of tree tokens it accepts more than the static tree.
#[test]
fn greedy_dynamic_tree_equals_plain_with_noisy_oracle() {
    let dir = tiny_llama("dynamic", 96, 4.0, 11);
    let teacher = load(&dir);
    let tree = Tree::default_tree();
    let dynamic = DynamicTree {
        tokens: tree.len(),
        depth: tree.max_depth(),
        top_k: 10,
    };
    let (mut tau_static, mut tau_dynamic) = (0.0, 0.0);
    for (i, prompt) in [vec![3i64, 17, 42, 5, 60], vec![9i64, 9, 9, 30, 31, 32, 33]]
        .iter()
        .enumerate()
    {
        let plain = plain_greedy(&teacher, prompt, 48, &[]);
        for (mode, tau) in [
            (TreeMode::Static(&tree), &mut tau_static),
            (TreeMode::Dynamic(dynamic), &mut tau_dynamic),
            (
                TreeMode::Dynamic(DynamicTree {
                    tokens: 5,
                    depth: 3,
                    top_k: 2,
                }),
                &mut 0.0,
            ),
        ] {
            let _rng = clover::rng::hold(100 + i as i64);
            let mut drafter = oracle(&teacher, prompt, 1.5);
            let (spec, stats) = generate_with_mode(
                &teacher,
                &mut drafter,
                mode,
                prompt,
                48,
                Sampling::greedy(),
                &[],
            )
            .unwrap();
            assert_eq!(spec.answer.token_ids, plain, "prompt {i}, {mode:?}");
            *tau += stats.tau() / 2.0;
        }
    }
    eprintln!("noisy oracle: tau static {tau_static:.2}, dynamic {tau_dynamic:.2} (26 tokens)");
    assert!(
        tau_dynamic > 2.0,
        "dynamic tree barely accepted: tau {tau_dynamic}"
    );
}

/// A random head with a draft vocabulary (static and dynamic trees): greedy output equals plain.
#[test]
fn greedy_with_draft_vocab_equals_plain_tiny() {
    let dir = tiny_llama("vocab", 96, 4.0, 31);
    let teacher = load(&dir);
    let head = random_head(&teacher, 5);
    let tree = Tree::default_tree();
    // Every third id: the teacher's own choices often fall outside, which must not matter.
    let ids: Vec<i64> = (0..96).step_by(3).collect();
    let vocab = head.slice_vocab(&ids, 10).unwrap();
    let dynamic = DynamicTree {
        tokens: 12,
        depth: 4,
        top_k: 4,
    };
    for prompt in [vec![3i64, 17, 42, 5, 60, 61, 62], vec![11i64, 12]] {
        let plain = plain_greedy(&teacher, &prompt, 40, &[]);
        for mode in [TreeMode::Static(&tree), TreeMode::Dynamic(dynamic)] {
            let spec = greedy_with_mode(&teacher, &head, Some(&vocab), mode, &prompt, (40, &[]));
            assert_eq!(spec, plain, "{mode:?}");
        }
    }
    // The drafts themselves never leave the vocabulary.
    let mut drafter = HeadDrafter::new(&head).with_vocab(Some(&vocab));
    let logits = drafter
        .step(
            &Tensor::zeros([2, teacher.config.hidden_size], (Kind::Float, Device::Cpu)),
            &Tensor::from_slice(&[1i64, 2]),
        )
        .unwrap()
        .0;
    let top = Vec::<i64>::try_from(logits.topk(10, -1, true, true).1.view([-1])).unwrap();
    assert!(top.iter().all(|t| t % 3 == 0), "{top:?}");
    assert!(head.slice_vocab(&[1, 1, 2], 1).is_err(), "duplicate ids");
    assert!(
        head.slice_vocab(&[1, 96], 1).is_err(),
        "id outside the vocabulary"
    );
    assert!(head.slice_vocab(&[1, 2], 10).is_err(), "smaller than top-k");
}

/// SmolLM2 with a random head: greedy output equals plain with a dynamic tree and with a
/// draft vocabulary (the 4,096 lowest ids: arbitrary, losslessness must not care).
#[test]
fn greedy_dynamic_and_draft_vocab_equal_plain_smollm2() {
    tch::set_num_threads(1);
    let dir = crate::common::smollm2_dir();
    let teacher = load(&dir);
    let head = random_head(&teacher, 1);
    let (prompt, stop) = crate::speculative::smollm2_chat_prompt(&dir);
    let plain = plain_greedy(&teacher, &prompt, 32, &stop);
    let ids: Vec<i64> = (0..4096).collect();
    let vocab = head.slice_vocab(&ids, 10).unwrap();
    let tree = Tree::default_tree();
    let dynamic = DynamicTree {
        tokens: 26,
        depth: 5,
        top_k: 10,
    };
    for (mode, vocab) in [
        (TreeMode::Dynamic(dynamic), None),
        (TreeMode::Static(&tree), Some(&vocab)),
        (TreeMode::Dynamic(dynamic), Some(&vocab)),
    ] {
        let spec = greedy_with_mode(&teacher, &head, vocab, mode, &prompt, (32, &stop));
        assert_eq!(spec, plain, "{mode:?}, vocab {}", vocab.is_some());
    }
    assert!(
        plain.len() >= 20,
        "answer too short to be a meaningful test"
    );
}

/// Chi-square of the first two sampled tokens against the teacher's exact joint law, for any
/// drafter and tree mode (as `speculative_sampling_end_to_end_first_tokens`).
fn first_two_tokens_are_lossless(
    teacher: &Teacher,
    prompt: &[i64],
    drafter: &mut dyn Drafter,
    mode: TreeMode,
    runs: i64,
) {
    let v = teacher.config.vocab_size;
    let temperature = 0.8;
    let (p1, p2) = tch::no_grad(|| {
        let seq = Tensor::from_slice(prompt).unsqueeze(0);
        let p1 = (last_logits(teacher, &seq) / temperature)
            .softmax(-1, Kind::Float)
            .view([-1]);
        let seqs = Tensor::cat(
            &[
                seq.expand([v, prompt.len() as i64], true),
                Tensor::arange(v, (Kind::Int64, Device::Cpu)).unsqueeze(1),
            ],
            1,
        );
        let p2 = (last_logits(teacher, &seqs) / temperature).softmax(-1, Kind::Float);
        (p1, p2)
    });
    let expected: Vec<f64> =
        Vec::<f64>::try_from((p1.unsqueeze(1) * p2).view([-1]).to_kind(Kind::Double)).unwrap();
    let mut counts = vec![0usize; (v * v) as usize];
    let mut accepted = 0;
    for i in 0..runs {
        let sampling = Sampling {
            temperature,
            seed: 1000 + i,
        };
        let (out, stats) =
            generate_with_mode(teacher, drafter, mode, prompt, 2, sampling, &[]).unwrap();
        let t = &out.answer.token_ids;
        counts[(t[0] * v + t[1]) as usize] += 1;
        accepted += stats.accepted.iter().sum::<usize>();
    }
    let (stat, df) = chi_square(&counts, &expected);
    eprintln!(
        "{mode:?}: chi2 {stat:.1} df {df} (crit {:.1}), {accepted} drafts accepted in {runs} runs",
        chi2_critical(df)
    );
    assert!(
        accepted > 0,
        "no draft was ever accepted: the test would not cover acceptance"
    );
    assert!(stat < chi2_critical(df), "chi-square {stat} over {df} dof");
}

/// Lossless sampling with a dynamic tree (bigram drafter) and with a draft vocabulary (a random
/// head restricted to 8 of 12 tokens, static and dynamic trees).
#[test]
fn speculative_sampling_is_lossless_with_dynamic_tree_and_draft_vocab() {
    tch::set_num_threads(1);
    let v = 12i64;
    let dir = tiny_llama("e2e-dyn", v, 1.5, 21);
    let teacher = load(&dir);
    let prompt = [3i64, 9, 4];
    let _rng = clover::rng::hold(99);
    let table = tch::no_grad(|| {
        let singles = Tensor::arange(v, (Kind::Int64, Device::Cpu)).unsqueeze(1);
        let l = last_logits(&teacher, &singles);
        &l + l.randn_like()
    });
    let dynamic = DynamicTree {
        tokens: 8,
        depth: 3,
        top_k: 3,
    };
    let mut bigram = BigramDrafter { table };
    first_two_tokens_are_lossless(
        &teacher,
        &prompt,
        &mut bigram,
        TreeMode::Dynamic(dynamic),
        1500,
    );
    let head = random_head(&teacher, 7);
    let ids = [0i64, 2, 3, 5, 6, 8, 9, 11];
    let vocab = head.slice_vocab(&ids, 3).unwrap();
    let small = Tree::from_paths(&[vec![0], vec![1], vec![2], vec![0, 0], vec![0, 1]], 3).unwrap();
    for mode in [TreeMode::Static(&small), TreeMode::Dynamic(dynamic)] {
        let mut drafter = HeadDrafter::new(&head).with_vocab(Some(&vocab));
        first_two_tokens_are_lossless(&teacher, &prompt, &mut drafter, mode, 1500);
    }
}
