//! `clover report`: eval reports (and the training logs of their heads, where found) as one
//! markdown table and PNG plots (docs/heads.md §4). Plots are drawn with plotters' bitmap
//! backend; text uses DejaVu Sans, compiled into the binary (the `dejavu` crate) and registered
//! with plotters' ab_glyph renderer, so nothing has to be installed on the machine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::decode::eval::EvalReport;
use crate::training::metrics::{EvalRecord, StepRecord};

/// What `clover report` is given.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// `clover eval --report` files, one per run; the file stem labels the run.
    pub evals: Vec<PathBuf>,
    /// Output directory for report.md and the PNGs (created).
    pub out: PathBuf,
}

/// Where an exported head came from: written by `clover export` as `provenance.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provenance {
    /// The checkpoint exported.
    pub checkpoint: PathBuf,
    /// The training run's out dir (metrics.jsonl, eval.jsonl).
    pub run_dir: PathBuf,
}

/// The provenance file's name inside an exported head directory.
pub const PROVENANCE_FILE: &str = "provenance.json";

/// One held-out evaluation of a training run, against the training tokens seen before it.
#[derive(Debug, Clone, PartialEq)]
pub struct CurvePoint {
    pub tokens: u64,
    pub loss: f64,
    /// Chained depth-0 top-1.
    pub chained_top1: f64,
}

/// One row of the comparison.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub label: String,
    /// The training run's name on the curve plots: the eval report's file stem (`label` adds the
    /// tree setting when one report holds several).
    pub run_label: String,
    pub head: String,
    pub parameters: Option<i64>,
    /// Tokens trained on (Σ of the run's `metrics.jsonl`), when the run was found.
    pub training_tokens: Option<u64>,
    pub tau: f64,
    pub tau_per_category: BTreeMap<String, f64>,
    pub acceptance_per_depth: Vec<f64>,
    pub speedup: f64,
    pub device: String,
    pub curve: Vec<CurvePoint>,
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(file: &Path) -> Result<Vec<T>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {}", file.display(), i + 1))
        })
        .collect()
}

/// The training run of an exported head dir, if its provenance names one with logs.
fn find_run_dir(draft_dir: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(draft_dir.join(PROVENANCE_FILE)).ok()?;
    let p: Provenance = serde_json::from_str(&text).ok()?;
    p.run_dir
        .join("metrics.jsonl")
        .is_file()
        .then_some(p.run_dir)
}

/// Training tokens and the held-out curve of a run dir. The tokens at an eval of step s are
/// those of steps 1..=s. A resumed run may have appended a step twice: the last record counts.
pub fn run_curve(run_dir: &Path) -> Result<(u64, Vec<CurvePoint>)> {
    let steps: Vec<StepRecord> = read_jsonl(&run_dir.join("metrics.jsonl"))?;
    let mut by_step: BTreeMap<u64, u64> = BTreeMap::new();
    for s in &steps {
        by_step.insert(s.step, s.tokens as u64);
    }
    let tokens_until = |step: u64| by_step.range(..=step).map(|(_, t)| t).sum::<u64>();
    let evals_file = run_dir.join("eval.jsonl");
    let evals: Vec<EvalRecord> = if evals_file.is_file() {
        read_jsonl(&evals_file)?
    } else {
        Vec::new()
    };
    let mut curve: BTreeMap<u64, CurvePoint> = BTreeMap::new();
    for e in evals {
        let point = CurvePoint {
            tokens: tokens_until(e.step),
            loss: e.loss,
            chained_top1: e.chained_top1.first().copied().unwrap_or(0.0),
        };
        curve.insert(e.step, point);
    }
    Ok((by_step.values().sum(), curve.into_values().collect()))
}

/// The runs of one eval report, with its training run where found: the report itself, or, when
/// it evaluated several tree settings, one run per setting ("STEM auto", "STEM default", ...),
/// the training curves with the first.
pub fn load_runs(eval_file: &Path) -> Result<Vec<RunSummary>> {
    let mut e = read_eval(eval_file)?;
    let trees = std::mem::take(&mut e.trees);
    let whole = summary_of(eval_file, e)?;
    if trees.len() < 2 {
        return Ok(vec![whole]);
    }
    Ok(trees
        .into_iter()
        .enumerate()
        .map(|(i, t)| RunSummary {
            label: format!("{} {}", whole.label, t.tree),
            tau: t.tau,
            tau_per_category: t.tau_per_category,
            acceptance_per_depth: t.acceptance_per_depth,
            speedup: t.speedup,
            curve: if i == 0 {
                whole.curve.clone()
            } else {
                Vec::new()
            },
            ..whole.clone()
        })
        .collect())
}

fn read_eval(eval_file: &Path) -> Result<EvalReport> {
    let text = std::fs::read_to_string(eval_file)
        .with_context(|| format!("reading {}", eval_file.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a `clover eval --report` file",
            eval_file.display()
        )
    })
}

/// One eval report's top-level figures and, where found, its training run.
fn summary_of(eval_file: &Path, e: EvalReport) -> Result<RunSummary> {
    let label = eval_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| eval_file.display().to_string());
    // Reports from before these fields existed read them as empty.
    let run = Some(e.draft_dir.as_str())
        .filter(|d| !d.is_empty())
        .map(Path::new)
        .and_then(find_run_dir);
    let (training_tokens, curve) = match run {
        Some(dir) => {
            let (tokens, curve) = run_curve(&dir)?;
            (Some(tokens), curve)
        }
        None => (None, Vec::new()),
    };
    Ok(RunSummary {
        run_label: label.clone(),
        label,
        head: Some(e.head)
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "clover2".into()),
        parameters: Some(e.head_parameters).filter(|&n| n > 0),
        training_tokens,
        tau: e.tau,
        tau_per_category: e.tau_per_category,
        acceptance_per_depth: e.acceptance_per_depth,
        speedup: e.speedup,
        device: e.device,
        curve,
    })
}

fn categories(runs: &[RunSummary]) -> Vec<String> {
    let set: BTreeSet<&String> = runs
        .iter()
        .flat_map(|r| r.tau_per_category.keys())
        .collect();
    set.into_iter().cloned().collect()
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "–".into(), |x| x.to_string())
}

/// The comparison as a markdown table: head, parameters, training tokens, tau overall and per
/// category, acceptance per depth, speedup, device.
pub fn markdown_table(runs: &[RunSummary]) -> String {
    let cats = categories(runs);
    let mut header = vec!["run", "head", "params", "training tokens", "τ"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    header.extend(cats.iter().map(|c| format!("τ {c}")));
    header.extend(["acceptance per depth", "speedup", "device"].map(String::from));
    let mut out = format!(
        "| {} |\n|{}\n",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for r in runs {
        let mut row = vec![
            r.label.clone(),
            r.head.clone(),
            or_dash(r.parameters),
            or_dash(r.training_tokens),
            format!("{:.3}", r.tau),
        ];
        row.extend(
            cats.iter()
                .map(|c| or_dash(r.tau_per_category.get(c).map(|t| format!("{t:.3}")))),
        );
        let acc: Vec<String> = r
            .acceptance_per_depth
            .iter()
            .map(|a| format!("{a:.3}"))
            .collect();
        row.push(acc.join(" / "));
        row.push(format!("{:.2}x", r.speedup));
        row.push(r.device.clone());
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out
}

/// The font every plot uses: DejaVu Sans from the binary, registered once.
const FONT: &str = "clover-sans";

fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    ensure!(ok, "the built-in DejaVu Sans font could not be registered");
    Ok(())
}

const SIZE: (u32, u32) = (960, 600);

fn plot_err<E: std::fmt::Debug>(file: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {}: {e:?}", file.display())
}

/// τ per category per run, as grouped bars (one group per category, one bar per run).
fn plot_tau_per_category(runs: &[RunSummary], file: &Path) -> Result<()> {
    let cats = categories(runs);
    let err = plot_err(file);
    let root = BitMapBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let top = runs
        .iter()
        .flat_map(|r| r.tau_per_category.values())
        .fold(1.0f64, |a, &b| a.max(b))
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption("τ per category", (FONT, 28))
        .margin(16)
        .x_label_area_size(60)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..cats.len().max(1) as f64, 0f64..top)
        .map_err(&err)?;
    let names = cats.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(cats.len().max(1) * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("τ (tokens per step)")
        .label_style((FONT, 16))
        .draw()
        .map_err(&err)?;
    let width = 0.8 / runs.len().max(1) as f64;
    for (j, r) in runs.iter().enumerate() {
        let color = Palette99::pick(j).to_rgba();
        let bars = cats.iter().enumerate().filter_map(|(i, c)| {
            let tau = *r.tau_per_category.get(c)?;
            let x0 = i as f64 + 0.1 + j as f64 * width;
            Some(Rectangle::new(
                [(x0, 0.0), (x0 + width, tau)],
                color.filled(),
            ))
        });
        chart
            .draw_series(bars)
            .map_err(&err)?
            .label(r.label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    legend(&mut chart).map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

type Axes = Cartesian2d<RangedCoordf64, RangedCoordf64>;

/// The series legend, top right, in the built-in font.
fn legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Axes>,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 16))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
}

/// The lower end of a y axis: padded below the data, but not below 0 when the data are not.
fn y_floor(y_min: f64, pad: f64) -> f64 {
    if y_min >= 0.0 {
        (y_min - pad).max(0.0)
    } else {
        y_min - pad
    }
}

/// Lines y(x) per run on one chart.
fn plot_lines(
    file: &Path,
    caption: &str,
    (x_desc, y_desc): (&str, &str),
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let err = plot_err(file);
    let root = BitMapBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let points = series.iter().flat_map(|s| s.1.iter());
    let (mut x_max, mut y_min, mut y_max) = (1e-9f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    let pad = ((y_max - y_min) * 0.1).max(1e-3);
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, (FONT, 28))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        // Shares and top-1 rates never go below 0: do not draw negative space for them.
        .build_cartesian_2d(0f64..x_max * 1.02, y_floor(y_min, pad)..y_max + pad)
        .map_err(&err)?;
    // Both x axes (depth, training tokens) count whole things: integer ticks only, one per
    // depth on a short axis.
    let x_ticks = if x_max <= 10.0 {
        x_max as usize + 1
    } else {
        10
    };
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(x_ticks)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style((FONT, 16))
        .draw()
        .map_err(&err)?;
    for (j, (label, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(j).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(3)))
            .map_err(&err)?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(3)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(&err)?;
    }
    legend(&mut chart).map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

/// The PNGs `write_report` draws, by file name.
pub const PLOTS: [&str; 4] = [
    "tau_per_category.png",
    "acceptance_per_depth.png",
    "heldout_loss.png",
    "chained_top1.png",
];

/// Writes `out/report.md` and the PNGs of `PLOTS`. Returns the runs as read.
pub fn write_report(opts: &ReportOptions) -> Result<Vec<RunSummary>> {
    ensure!(
        !opts.evals.is_empty(),
        "clover report needs at least one eval report"
    );
    register_font()?;
    let runs: Vec<RunSummary> = opts
        .evals
        .iter()
        .map(|f| load_runs(f))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    plot_all(&runs, &opts.out)?;
    write_markdown(&runs, opts)?;
    Ok(runs)
}

/// The four plots of `PLOTS` into `out`.
fn plot_all(runs: &[RunSummary], out: &Path) -> Result<()> {
    plot_tau_per_category(runs, &out.join(PLOTS[0]))?;
    let acceptance: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|r| {
            let pts = r.acceptance_per_depth.iter().enumerate();
            (
                r.label.clone(),
                pts.map(|(d, &a)| ((d + 1) as f64, a)).collect(),
            )
        })
        .collect();
    plot_lines(
        &out.join(PLOTS[1]),
        "acceptance per depth (share of steps accepting ≥ d drafts)",
        ("depth d", "share of steps"),
        &acceptance,
    )?;
    // Training curves: once per training run (the tree settings of one eval share theirs).
    let with_curve: Vec<&RunSummary> = runs.iter().filter(|r| !r.curve.is_empty()).collect();
    let curve_runs = if with_curve.is_empty() {
        runs.iter().collect()
    } else {
        with_curve
    };
    let curve = |f: fn(&CurvePoint) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        curve_runs
            .iter()
            .map(|r| {
                (
                    r.run_label.clone(),
                    r.curve.iter().map(|p| (p.tokens as f64, f(p))).collect(),
                )
            })
            .collect()
    };
    plot_lines(
        &out.join(PLOTS[2]),
        "held-out loss (each head's own training loss)",
        ("training tokens", "loss"),
        &curve(|p| p.loss),
    )?;
    plot_lines(
        &out.join(PLOTS[3]),
        "held-out chained depth-0 top-1",
        ("training tokens", "top-1 agreement with the teacher"),
        &curve(|p| p.chained_top1),
    )?;
    Ok(())
}

/// report.md: the table, what its columns mean, and the plots.
fn write_markdown(runs: &[RunSummary], opts: &ReportOptions) -> Result<()> {
    let mut md = String::from("# Draft-head comparison\n\n");
    md.push_str(&format!(
        "Eval reports: {}.\n\n",
        opts.evals
            .iter()
            .map(|p| format!("`{}`", p.display()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    md.push_str(&markdown_table(runs));
    md.push_str(
        "\nτ: committed tokens per verification step. Acceptance per depth: share of steps \
         accepting at least d drafts. Training tokens and the curves come from each head's \
         training run (`provenance.json` of the exported head); – where it was not found. The \
         held-out loss is each head's own training loss (the heads' losses weigh their terms \
         differently, so compare its trend, not its level across heads).\n\n",
    );
    for p in PLOTS {
        md.push_str(&format!("![{p}]({p})\n\n"));
    }
    let md_file = opts.out.join("report.md");
    std::fs::write(&md_file, md).with_context(|| format!("writing {}", md_file.display()))?;
    Ok(())
}
