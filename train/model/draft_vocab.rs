//! Draft vocabularies (FR-Spec, EAGLE-3): the draft scores only N of the teacher's V tokens, with
//! the matching rows of the frozen lm_head in one [N,H] matrix (docs/clover2.md §5.1, `--draft-vocab`).
//!
//! Draft index i stands for teacher id `ids[i]`. A head trained with one (`draft_vocab = N`)
//! stores the mapping in EAGLE-3's convention: `d2t[i] = ids[i] - i` (the offset to add to a draft
//! index) and `t2d[v]` = whether teacher token v is in the vocabulary.

use anyhow::{bail, ensure, Result};
use tch::{Kind, Tensor};

/// Tensor names of the mapping in an exported or checkpointed head (EAGLE-3's).
pub const D2T: &str = "d2t";
pub const T2D: &str = "t2d";

pub struct DraftVocab {
    ids: Tensor,
    weight: Tensor,
    /// t2d as a bool [V] tensor on the weight's device.
    member: Tensor,
    vocab_size: i64,
}

impl DraftVocab {
    /// `ids`: distinct teacher token ids, at least `min_len` of them (the tree's top-k), over the
    /// frozen lm_head [V,H].
    pub fn new(lm_head: &Tensor, ids: &[i64], min_len: usize) -> Result<Self> {
        let vocab_size = lm_head.size()[0];
        ensure!(
            ids.len() >= min_len.max(1),
            "a draft vocabulary of {} tokens is smaller than the tree's top-k {min_len}",
            ids.len()
        );
        if let Some(bad) = ids.iter().find(|&&i| i < 0 || i >= vocab_size) {
            bail!("draft vocabulary token {bad} is outside the teacher's {vocab_size} ids");
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = ids.iter().find(|&&i| !seen.insert(i)) {
            bail!("draft vocabulary lists token {dup} twice");
        }
        let device = lm_head.device();
        let ids = Tensor::from_slice(ids).to_device(device);
        let member = Tensor::zeros([vocab_size], (Kind::Bool, device)).index_fill(0, &ids, 1);
        Ok(Self {
            weight: lm_head.index_select(0, &ids),
            ids,
            member,
            vocab_size,
        })
    }

    /// The vocabulary of an exported head's `d2t` offsets (teacher id = index + d2t[index]).
    pub fn from_d2t(lm_head: &Tensor, d2t: &Tensor) -> Result<Self> {
        Self::new(lm_head, &ids_of_d2t(d2t)?, 1)
    }

    pub fn len(&self) -> usize {
        self.ids.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Teacher ids in draft order [N] i64.
    pub fn ids(&self) -> &Tensor {
        &self.ids
    }

    /// EAGLE-3's `d2t` offsets [N] i64 on the CPU: teacher id = index + d2t[index].
    pub fn d2t(&self) -> Tensor {
        d2t_of_ids(&self.ids)
    }

    /// The mapping as EAGLE-3 exports it: `d2t` [N] i64 and `t2d` [V] bool, on the CPU.
    pub fn mapping(&self) -> [(&'static str, Tensor); 2] {
        mapping_of_ids(&self.ids, self.vocab_size)
    }

    /// [n,H] -> [n,N]: the draft-space logits, one [n,N] matmul.
    pub fn draft_logits(&self, o: &Tensor) -> Tensor {
        crate::model::layers::linear(&o.to_kind(self.weight.kind()), &self.weight, None)
    }

    /// [n,H] -> [n,V]: the draft-space logits scattered to teacher ids, -inf elsewhere, so top-k,
    /// the draft distribution q and verification all stay in teacher ids and the sampler stays
    /// lossless (q is simply zero outside the vocabulary).
    pub fn logits(&self, o: &Tensor) -> Tensor {
        self.scatter(&self.draft_logits(o))
    }

    /// Draft-space logits [n,N] (the frozen rows' or a head's own lm_head's) placed at their
    /// teacher ids [n,V], -inf elsewhere.
    pub fn scatter(&self, small: &Tensor) -> Tensor {
        let rows = small.size()[0];
        Tensor::full(
            [rows, self.vocab_size],
            f64::NEG_INFINITY,
            (small.kind(), small.device()),
        )
        .index_copy(1, &self.ids, small)
    }

    /// Teacher-space columns [.., V] -> draft space [.., N].
    pub fn restrict(&self, teacher_logits: &Tensor) -> Tensor {
        teacher_logits.index_select(-1, &self.ids)
    }

    /// Whether each teacher id of `tokens` is in the vocabulary (bool, same shape).
    pub fn contains(&self, tokens: &Tensor) -> Tensor {
        self.member
            .index_select(0, &tokens.reshape([-1]))
            .reshape(tokens.size().as_slice())
    }
}

/// Teacher ids of `d2t` offsets: id = index + d2t[index].
fn ids_of_d2t(d2t: &Tensor) -> Result<Vec<i64>> {
    ensure!(
        d2t.dim() == 1,
        "{D2T} must be one-dimensional, got shape {:?}",
        d2t.size()
    );
    let d2t = d2t.to_kind(Kind::Int64).to_device(tch::Device::Cpu);
    let ids = &d2t + Tensor::arange(d2t.size()[0], (Kind::Int64, tch::Device::Cpu));
    Ok(Vec::<i64>::try_from(&ids)?)
}

/// EAGLE-3's `d2t` and `t2d` of teacher ids (on the CPU).
fn mapping_of_ids(ids: &Tensor, vocab_size: i64) -> [(&'static str, Tensor); 2] {
    let ids = ids.to_device(tch::Device::Cpu);
    let t2d = Tensor::zeros([vocab_size], (Kind::Bool, tch::Device::Cpu)).index_fill(0, &ids, 1);
    [(D2T, d2t_of_ids(&ids)), (T2D, t2d)]
}

/// `d2t` offsets of teacher ids (on the CPU): ids[i] - i.
fn d2t_of_ids(ids: &Tensor) -> Tensor {
    let ids = ids.to_device(tch::Device::Cpu);
    let index = Tensor::arange(ids.size()[0], (Kind::Int64, tch::Device::Cpu));
    ids - index
}

/// The full mapping (`d2t` and `t2d`) of stored `d2t` offsets over a teacher of `vocab_size` ids.
pub fn mapping_of_d2t(d2t: &Tensor, vocab_size: i64) -> Result<[(&'static str, Tensor); 2]> {
    let ids = ids_of_d2t(d2t)?;
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i >= vocab_size) {
        bail!("{D2T} maps to token {bad}, outside the teacher's {vocab_size} ids");
    }
    Ok(mapping_of_ids(&Tensor::from_slice(&ids), vocab_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lm_head() -> Tensor {
        // Row v = [v, 1]: logits of o = [a, b] are a·v + b.
        let v = Tensor::arange(8, (Kind::Float, tch::Device::Cpu)).unsqueeze(1);
        Tensor::cat(&[v.shallow_clone(), v.ones_like()], 1)
    }

    #[test]
    fn d2t_round_trips_and_logits_land_on_teacher_ids() {
        let vocab = DraftVocab::new(&lm_head(), &[2, 5, 7], 2).unwrap();
        let [(d2t_name, d2t), (t2d_name, t2d)] = vocab.mapping();
        assert_eq!((d2t_name, t2d_name), ("d2t", "t2d"));
        assert_eq!(Vec::<i64>::try_from(&d2t).unwrap(), vec![2, 4, 5]);
        assert_eq!(
            Vec::<bool>::try_from(&t2d).unwrap(),
            vec![false, false, true, false, false, true, false, true]
        );
        let back = DraftVocab::from_d2t(&lm_head(), &d2t).unwrap();
        assert_eq!(back.d2t(), vocab.d2t());

        let o = Tensor::from_slice(&[1.0f32, 0.5]).unsqueeze(0);
        let small = Vec::<f32>::try_from(vocab.draft_logits(&o).view([-1])).unwrap();
        assert_eq!(small, vec![2.5, 5.5, 7.5]);
        let full = Vec::<f32>::try_from(vocab.logits(&o).view([-1])).unwrap();
        assert_eq!(full[5], 5.5);
        assert!(full[4].is_infinite() && full[4] < 0.0);
        let tokens = Tensor::from_slice(&[7i64, 3, 2]);
        assert_eq!(
            Vec::<bool>::try_from(vocab.contains(&tokens)).unwrap(),
            vec![true, false, true]
        );
    }

    #[test]
    fn bad_vocabularies_are_refused() {
        assert!(
            DraftVocab::new(&lm_head(), &[1, 8], 1).is_err(),
            "id 8 >= V"
        );
        assert!(
            DraftVocab::new(&lm_head(), &[1, 1], 1).is_err(),
            "duplicate"
        );
        assert!(
            DraftVocab::new(&lm_head(), &[1, 2], 3).is_err(),
            "below top-k"
        );
    }
}
