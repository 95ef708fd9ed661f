//! AdamW with saveable moments, the linear warm-up/decay schedule and gradient clipping.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use tch::{Kind, Tensor};

use crate::formats::safetensors::write_tensors;

/// AdamW with saveable state. tch's `nn::Optimizer` keeps its moments inside libtorch with no
/// API to read or write them, so an exact `--resume` needs our own: this is torch.optim.AdamW's
/// update (decoupled decay p ← p·(1−lr·wd), bias-corrected moments, eps outside the sqrt).
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: i64,
    pub m: BTreeMap<String, Tensor>,
    pub v: BTreeMap<String, Tensor>,
}

impl AdamW {
    pub fn new(
        params: &BTreeMap<String, Tensor>,
        betas: (f64, f64),
        eps: f64,
        weight_decay: f64,
    ) -> Self {
        let zeros = |p: &Tensor| Tensor::zeros_like(p);
        AdamW {
            beta1: betas.0,
            beta2: betas.1,
            eps,
            weight_decay,
            step: 0,
            m: params.iter().map(|(n, p)| (n.clone(), zeros(p))).collect(),
            v: params.iter().map(|(n, p)| (n.clone(), zeros(p))).collect(),
        }
    }

    /// One update of every parameter that has a gradient.
    pub fn update(&mut self, params: &BTreeMap<String, Tensor>, lr: f64) {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for (name, p) in params {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                let m = self.m.get_mut(name).expect("moment for every parameter");
                let _ = m.g_mul_scalar_(self.beta1);
                let _ = m.g_add_(&(&g * (1.0 - self.beta1)));
                let v = self.v.get_mut(name).expect("moment for every parameter");
                let _ = v.g_mul_scalar_(self.beta2);
                let _ = v.g_add_(&(&g * &g * (1.0 - self.beta2)));
                let denom = v.sqrt() / bc2.sqrt() + self.eps;
                let _ = p.g_sub_(&(&*m / denom * (lr / bc1)));
            }
        });
    }

    pub(crate) fn save(&self, file: &Path) -> Result<()> {
        let mut all = BTreeMap::new();
        for (n, t) in &self.m {
            all.insert(format!("m.{n}"), t.shallow_clone());
        }
        for (n, t) in &self.v {
            all.insert(format!("v.{n}"), t.shallow_clone());
        }
        write_tensors(file, &all)
    }

    pub(crate) fn load(&mut self, file: &Path, step: i64) -> Result<()> {
        let all: BTreeMap<String, Tensor> = Tensor::read_safetensors(file)
            .with_context(|| format!("reading {}", file.display()))?
            .into_iter()
            .collect();
        for (prefix, map) in [("m", &mut self.m), ("v", &mut self.v)] {
            for (n, t) in map.iter_mut() {
                let src = all
                    .get(&format!("{prefix}.{n}"))
                    .with_context(|| format!("{}: no {prefix}.{n}", file.display()))?;
                ensure!(
                    src.size() == t.size(),
                    "{}: {prefix}.{n} has shape {:?}",
                    file.display(),
                    src.size()
                );
                *t = src.to_device(t.device()).to_kind(t.kind());
            }
        }
        self.step = step;
        Ok(())
    }
}

/// get_linear_schedule_with_warmup's factor at optimizer step `step` (0-based: the first step
/// uses lambda(0), which is 0 when there is a warm-up, as in HF).
pub fn lr_factor(step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let rest = total.saturating_sub(warmup).max(1);
    (total.saturating_sub(step) as f64 / rest as f64).max(0.0)
}

/// L2 norm of all gradients (logged before clipping).
pub(crate) fn grad_norm(params: &BTreeMap<String, Tensor>) -> f64 {
    let mut sq = 0.0;
    for p in params.values() {
        let g = p.grad();
        if g.defined() {
            sq += g
                .to_kind(Kind::Double)
                .pow_tensor_scalar(2)
                .sum(Kind::Double)
                .double_value(&[]);
        }
    }
    sq.sqrt()
}

pub(crate) fn zero_grads(params: &BTreeMap<String, Tensor>) {
    for p in params.values() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// clip_grad_value_: clamp every gradient element to [-clip, clip].
pub(crate) fn clip_grads_by_value(params: &BTreeMap<String, Tensor>, clip: f64) {
    for p in params.values() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.clamp_(-clip, clip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, OptimizerConfig};
    use tch::Device;

    #[test]
    fn linear_warmup_then_linear_decay_as_hf() {
        assert_eq!(lr_factor(0, 4, 10), 0.0);
        assert_eq!(lr_factor(2, 4, 10), 0.5);
        assert_eq!(lr_factor(4, 4, 10), 1.0);
        assert_eq!(lr_factor(7, 4, 10), 0.5);
        assert_eq!(lr_factor(10, 4, 10), 0.0);
        assert_eq!(lr_factor(0, 0, 10), 1.0);
    }

    #[test]
    fn own_adamw_matches_torch_adamw() {
        // Same decoupled weight decay and bias correction as torch.optim.AdamW (tch's nn::AdamW).
        let target = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0]).view([2, 2]);
        let vs = nn::VarStore::new(Device::Cpu);
        let p_ref = vs.root().var_copy(
            "p",
            &Tensor::from_slice(&[0.1f32, 0.2, -0.3, 0.4]).view([2, 2]),
        );
        let mut torch_opt = nn::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            wd: 0.01,
            eps: 1e-8,
            amsgrad: false,
        }
        .build(&vs, 1e-2)
        .unwrap();
        let p_own = Tensor::from_slice(&[0.1f32, 0.2, -0.3, 0.4])
            .view([2, 2])
            .set_requires_grad(true);
        let params = BTreeMap::from([("p".to_string(), p_own.shallow_clone())]);
        let mut own = AdamW::new(&params, (0.9, 0.95), 1e-8, 0.01);
        for _ in 0..5 {
            torch_opt.zero_grad();
            (&p_ref - &target)
                .pow_tensor_scalar(2)
                .sum(Kind::Float)
                .backward();
            torch_opt.step();
            let mut g = p_own.grad();
            if g.defined() {
                let _ = g.zero_();
            }
            (&p_own - &target)
                .pow_tensor_scalar(2)
                .sum(Kind::Float)
                .backward();
            own.update(&params, 1e-2);
        }
        let d = (&p_ref - &p_own).abs().max().double_value(&[]);
        // Each side rounds p twice a step (decay, update) at ulp(|p| < 0.5) = 3e-8; the update's own
        // rounding is ~u·lr: 5 steps stay within 5·2·3e-8 = 3e-7 < 1e-6.
        assert!(d < 1e-6, "own AdamW differs from torch's by {d}");
    }
}
