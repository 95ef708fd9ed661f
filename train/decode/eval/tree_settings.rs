//! The tree settings an evaluation decodes with, as named on the command line: static trees,
//! the grown tree, and `auto` (the search's pick on a calibration of this head and device).

use anyhow::{ensure, Result};
use serde::Serialize;

use crate::decode::calibrate::{answered_texts, calibrate, Calibration};
use crate::decode::drafter::{drafting_vocab, DraftVocab};
use crate::decode::dynamic::DynamicTree;
use crate::decode::tree::Tree;
use crate::decode::tree_policy::TreeMode;
use crate::decode::tree_search::{best_tree, SearchResult};
use crate::decode::tree_spec::TreeSpec;
use crate::formats::chat::ChatTokenizer;
use crate::model::head::DraftHead;
use crate::model::teacher::Teacher;

use crate::decode::eval::{EvalOptions, Question};

/// What `--tree auto` chose: the search's answer and the calibration it read or measured.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AutoChoice {
    pub search: SearchResult,
    pub calibration: Calibration,
}

/// What a tree setting decodes with.
pub enum TreeKind {
    /// Plain decoding (what "auto" picks when no tree pays).
    Plain,
    Static(Tree),
    Dynamic(DynamicTree),
}

/// A named tree setting.
pub struct TreeSetting {
    pub name: String,
    pub kind: TreeKind,
}

impl TreeSetting {
    pub fn tree_tokens(&self) -> usize {
        match &self.kind {
            TreeKind::Plain => 1,
            TreeKind::Static(t) => t.len(),
            TreeKind::Dynamic(d) => d.tokens,
        }
    }

    pub fn max_depth(&self) -> usize {
        self.mode().map_or(0, |m| m.max_depth())
    }

    pub(super) fn mode(&self) -> Option<TreeMode<'_>> {
        match &self.kind {
            TreeKind::Plain => None,
            TreeKind::Static(t) => Some(TreeMode::Static(t)),
            TreeKind::Dynamic(d) => Some(TreeMode::Dynamic(*d)),
        }
    }
}

/// The "auto" tree: the search's pick on `calib` (read, or measured now).
fn auto_setting(
    args: &EvalOptions,
    (teacher, chat): (&Teacher, &ChatTokenizer),
    head: &DraftHead,
    vocab: Option<&DraftVocab>,
    evaluated: &[Question],
) -> Result<(TreeSetting, AutoChoice)> {
    let calibration = match &args.calib {
        Some(path) => Calibration::read(path)?,
        None => {
            let limit = args.calibration_limit.unwrap_or(usize::MAX);
            let texts = if args.calibration_prompts.is_empty() {
                args.calibration_texts.iter().take(limit).cloned().collect()
            } else {
                let mut held_out = held_out_prompts(&args.calibration_prompts, evaluated);
                ensure!(
                    !held_out.is_empty(),
                    "every --calib-prompts prompt is also evaluated: calibrating on them would \
                     fit the tree to the test"
                );
                held_out.truncate(limit);
                answered_texts(teacher, chat, &held_out, args.max_new_tokens)?
            };
            ensure!(
                !texts.is_empty(),
                "--tree auto needs a calibration: --calib FILE (from `clover calibrate`), \
                 --calib-prompts FILE, or --data DIR (prepared data whose eval split calibrates)"
            );
            calibrate(teacher, head, vocab, &texts, &args.calibrate)?
        }
    };
    ensure!(
        (calibration.temperature - args.temperature).abs() < 1e-9,
        "the calibration's acceptance table is for temperature {} but this evaluation samples at \
         {}: calibrate again with --temperature {}",
        calibration.temperature,
        args.temperature,
        args.temperature
    );
    let used = drafting_vocab(head, vocab);
    ensure!(
        calibration.draft_vocab == used,
        "the calibration was measured with draft vocabulary {:?} but this evaluation drafts with \
         {used:?}: calibrate again with the same --draft-vocab",
        calibration.draft_vocab
    );
    let search = best_tree(&calibration.acceptance, &calibration.costs, args.search);
    let kind = if search.is_plain() {
        TreeKind::Plain
    } else {
        TreeKind::Static(Tree::from_paths(&search.paths, calibration.top_k)?)
    };
    eprintln!(
        "auto tree: {} ({} tokens), expected tau {:.3}, {:.1} tokens/s predicted against {:.1} \
         plain",
        if search.is_plain() {
            "plain decoding".to_string()
        } else {
            serde_json::to_string(&search.paths)?
        },
        search.paths.len() + 1,
        search.expected_tau,
        search.tokens_per_s,
        search.plain_tokens_per_s
    );
    Ok((
        TreeSetting {
            name: "auto".into(),
            kind,
        },
        AutoChoice {
            search,
            calibration,
        },
    ))
}

/// The calibration prompts that are no turn of an evaluated question.
fn held_out_prompts(prompts: &[String], evaluated: &[Question]) -> Vec<String> {
    let asked: std::collections::HashSet<&str> = evaluated
        .iter()
        .flat_map(|q| q.turns.iter().map(String::as_str))
        .collect();
    prompts
        .iter()
        .filter(|p| !asked.contains(p.as_str()))
        .cloned()
        .collect()
}

/// The settings named on the command line, in order.
pub(super) fn tree_settings(
    args: &EvalOptions,
    (teacher, chat): (&Teacher, &ChatTokenizer),
    head: &DraftHead,
    vocab: Option<&DraftVocab>,
    evaluated: &[Question],
) -> Result<(Vec<TreeSetting>, Option<AutoChoice>)> {
    ensure!(!args.trees.is_empty(), "--tree names no tree setting");
    let mut settings = Vec::new();
    let mut auto = None;
    for spec in &args.trees {
        let name = spec.to_string();
        let setting = match spec {
            TreeSpec::Dynamic | TreeSpec::Auto if !head.arch().searches_trees() => {
                anyhow::bail!(
                    "--tree {spec} works with Clover-2 heads (the searched and grown trees are \
                     only validated on them); this head is {}: use a static tree",
                    head.config().options.head.name()
                )
            }
            TreeSpec::Dynamic => {
                args.dynamic.check()?;
                TreeSetting {
                    name,
                    kind: TreeKind::Dynamic(args.dynamic),
                }
            }
            TreeSpec::Auto => {
                let (setting, choice) =
                    auto_setting(args, (teacher, chat), head, vocab, evaluated)?;
                auto = Some(choice);
                setting
            }
            TreeSpec::Default | TreeSpec::Chain(_) | TreeSpec::File(_) => TreeSetting {
                name,
                kind: TreeKind::Static(spec.static_tree("eval")?),
            },
        };
        settings.push(setting);
    }
    Ok((settings, auto))
}
