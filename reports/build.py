"""`ign-bench report` and `ign-bench paper`: one sweep's MLflow experiment -> reports/<sweep>/.

    build_report(sweep, out_dir=None, tracking_uri=None) -> Path of report.md

reads the sweep's runs with `mlflow.search_runs` (pandas) and MlflowClient (metric histories,
artifacts) and writes

    report.md, report.html      the report; the HTML is self-contained (figures inlined as base64)
    tables/<name>.csv|md|tex    every table (CSV: full precision; LaTeX: booktabs)
    figures/<name>.png          every figure
    manifest.json               the tables and figures with each figure's pixel size

Nothing is trained: the paper's figures come from forward passes of the best run's saved model.
Building twice from the same store gives byte-identical tables (sorted rows and columns, fixed
formatting, no timestamps anywhere). Failed, unfinished or metric-less runs never stop a build:
their cells read "—" and their rows say "failed: <error>".

`make_paper()` runs what is missing for the paper's artefacts (sweeps/paper.yaml on a GPU; a
reduced version of it on CPU, PAPER_CPU) and then builds that sweep's report.
"""
from __future__ import annotations

import base64
import contextlib
import html as htmlmod
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from . import data as D
from .figures import Figure
from .tables import MISSING, Table, ablation_table, axis_label, k_tables, projection_tables, runs_table, table1

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
REPORTS_DIR = PROJECT_ROOT / "reports"
LOSS_KEYS = ("train/rec", "train/idem", "train/tight")


# ---------------------------------------------------------------------------------------------
# Reading MLflow.

@contextlib.contextmanager
def _tracking(uri: str):
    """mlflow.search_runs reads the global tracking URI; set it for the call and restore it (and
    the MLFLOW_TRACKING_URI variable that set_tracking_uri also sets) afterwards."""
    import mlflow
    import mlflow.tracking._tracking_service.utils as tu
    prev, env = tu._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(prev)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def load_runs(sweep: str, tracking_uri: Optional[str] = None):
    """(experiment, runs DataFrame as mlflow.search_runs returns it, client). ValueError naming the
    sweep when the store has no such experiment."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from harness.tracking import tracking_uri as default_uri
    uri = tracking_uri or default_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(sweep)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        raise ValueError(f"sweep: no MLflow experiment {sweep!r} at {uri}; allowed: {', '.join(names) or '(none yet)'}")
    with _tracking(uri):
        df = mlflow.search_runs([exp.experiment_id], max_results=100000, output_format="pandas")
    if len(df):
        df = df.sort_values("run_id").reset_index(drop=True)
    return exp, df, client, uri


def metric_histories(client, run_ids, keys=LOSS_KEYS) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    out = {}
    for rid in sorted(run_ids):
        h = {}
        for key in keys:
            try:
                pts = sorted(client.get_metric_history(rid, key), key=lambda m: (m.step, m.timestamp))
            except Exception as e:  # a store without the metric: no curve, not a crash
                log.warning("metric history %s of %s: %s", key, rid, e)
                pts = []
            last = {}
            for m in pts:  # one value per step (a resumed trial may log a step twice: keep the last)
                last[m.step] = m.value
            h[key] = (sorted(last), [last[s] for s in sorted(last)])
        out[rid] = h
    return out


def config_from_params(row: pd.Series):
    """The resolved TrialConfig of a run, rebuilt from its MLflow params alone (STYLE §6)."""
    from harness.config import TrialConfig, unflatten
    flat = {c[len("params."):]: D.parse_value(v) for c, v in row.items()
            if c.startswith("params.") and isinstance(v, str)}
    for k, v in list(flat.items()):
        if isinstance(v, tuple):
            flat[k] = list(v)
        elif k in ("data.root", "preset", "device", "model.name") and v is not None:
            flat[k] = str(v)  # string fields whose value may look like a number
    return TrialConfig.model_validate(unflatten(flat))


def sweep_spec(sweep: str):
    """The sweep's spec from sweeps/, when there is one (for its metric and mode), else None."""
    try:
        from harness.sweep import load_spec
        return load_spec(sweep)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# The document: blocks rendered to Markdown and to self-contained HTML.

@dataclass
class Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str):
        self.blocks.append(("h", (level, text)))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def ul(self, items: list[str]):
        if items:
            self.blocks.append(("ul", items))

    def table(self, t: Table):
        self.blocks.append(("table", t))

    def figure(self, f: Figure):
        self.blocks.append(("figure", f))

    def to_markdown(self) -> str:
        out = []
        for kind, b in self.blocks:
            if kind == "h":
                out.append("#" * b[0] + " " + b[1])
            elif kind == "p":
                out.append(b)
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in b))
            elif kind == "table":
                notes = "".join(f"\n\n{n}" for n in b.notes)
                out.append(f"**{b.title}** ([csv](tables/{b.name}.csv), [tex](tables/{b.name}.tex))\n\n"
                           + b.to_markdown().rstrip() + notes)
            elif kind == "figure":
                out.append(f"![{b.caption}]({b.file})\n\n*{b.caption}*")
        return "\n\n".join(out) + "\n"

    def to_html(self, folder: Path, title: str) -> str:
        out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
               f"<title>{htmlmod.escape(title)}</title>", f"<style>{_CSS}</style>", "</head><body>"]
        for kind, b in self.blocks:
            if kind == "h":
                out.append(f"<h{b[0]}>{_inline(b[1])}</h{b[0]}>")
            elif kind == "p":
                out.append(f"<p>{_inline(b)}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b) + "</ul>")
            elif kind == "table":
                notes = "".join(f"<p class=\"note\">{_inline(n)}</p>" for n in b.notes)
                out.append(f"<div class=\"table\"><p class=\"caption\"><b>{htmlmod.escape(b.title)}</b></p>"
                           f"{b.to_html()}{notes}</div>")
            elif kind == "figure":
                data = base64.b64encode((folder / b.file).read_bytes()).decode()
                out.append(f"<figure><img src=\"data:image/png;base64,{data}\" width=\"{b.width}\" "
                           f"alt=\"{htmlmod.escape(b.caption)}\"><figcaption>{_inline(b.caption)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:1260px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:12px;margin:.5em 0}th,td{padding:2px 8px;border-bottom:1px solid #ddd}"
        "th{border-bottom:2px solid #444;text-align:left}td.num{text-align:right;white-space:nowrap}"
        "tr.section td{font-style:italic;background:#f4f4f4}div.table{overflow-x:auto;margin:1.2em 0}"
        "img{max-width:100%;height:auto}figure{margin:1.2em 0}figcaption{font-size:13px;color:#444}"
        "p.note{font-size:12px;color:#555;margin:.2em 0}code{background:#f4f4f4;padding:0 3px}")


def _inline(text: str) -> str:
    """The Markdown the report uses inline (`code`, **bold**, [text](url)) as HTML."""
    t = htmlmod.escape(text, quote=False)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', t)


# ---------------------------------------------------------------------------------------------
# The report.

@dataclass
class Part:
    """The runs of one data set within the sweep, and what the report derives from them."""
    dataset: str
    df: pd.DataFrame
    configs: D.Configs
    reference: Optional[tuple]
    labels: dict[tuple, str]
    metric: Optional[str]
    mode: str
    best: Optional[tuple]
    best_run: Optional[str]
    suffix: str                    # file-name suffix ("" for a single data set)


def config_labels(configs: D.Configs, reference: Optional[tuple]) -> dict[tuple, str]:
    """Short names of configurations: the diff from the baseline for one-factor variants
    ("λt=0.3"; the baseline is "baseline"), else every axis value."""
    out = {}
    keys = list(configs.table["key"])
    if reference is not None and reference in keys:  # the baseline first (legends, colours)
        keys = [reference] + [k for k in keys if k != reference]
    for key in keys:
        if not configs.axes:
            out[key] = "all runs"
            continue
        pairs = list(zip(configs.axes, key))
        if reference is not None:
            diff = [(a, v) for (a, v), r in zip(pairs, reference) if v != r]
            out[key] = "baseline" if not diff else ", ".join(f"{axis_label(a)}={D.format_value(v)}" for a, v in diff)
        else:
            out[key] = ", ".join(f"{axis_label(a)}={D.format_value(v)}" for a, v in pairs)
    return out


def make_part(df: pd.DataFrame, dataset: str, suffix: str, preferred_metric: Optional[str],
              preferred_mode: Optional[str]) -> Part:
    axes = D.axes_of(df)
    configs = D.aggregate(df, axes)
    reference = D.reference_key(df, configs) if D.is_one_factor(df) else None
    metric, mode = D.selection_metric(df, preferred_metric, preferred_mode)
    best = D.best_key(configs, metric, mode) if metric else None
    best_run = D.best_run(df, configs.runs[best], metric, mode) if best is not None else None
    return Part(dataset, df, configs, reference, config_labels(configs, reference), metric, mode, best, best_run, suffix)


def build_report(sweep: str = "default", out_dir: Optional[str | Path] = None,
                 tracking_uri: Optional[str] = None, checkpoint_figures: bool = True,
                 scale_note: Optional[str] = None) -> Path:
    """Build the report of one sweep (see the module doc) and return the path of its report.md.

    Args:
        sweep: the sweep name = its MLflow experiment's name.
        out_dir: where to write (default reports/<sweep>/ in the project). Tables and figures
            from an earlier build there are replaced.
        tracking_uri: the MLflow store (default harness.tracking.tracking_uri()).
        checkpoint_figures: regenerate the paper's figures from the best run's checkpoint
            (forward passes on CPU); False skips them (quick looks, tests of the tables).
        scale_note: a line for the header saying at what scale the runs were made (make_paper).
    Raises ValueError (one line) when the store has no experiment of that name.
    """
    exp, df, client, uri = load_runs(sweep, tracking_uri)
    out = Path(out_dir) if out_dir else REPORTS_DIR / sweep
    tables_dir, figures_dir = out / "tables", out / "figures"
    for folder, pattern in ((tables_dir, "*.csv"), (tables_dir, "*.md"), (tables_dir, "*.tex"), (figures_dir, "*.png")):
        for p in folder.glob(pattern) if folder.is_dir() else []:
            p.unlink()
    tables_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)

    spec = sweep_spec(sweep)
    pref_metric = _tag_value(df, "sweep_metric") or (spec.metric if spec else None)
    pref_mode = _tag_value(df, "sweep_mode") or (spec.mode if spec else None)
    datasets = sorted(set(D.param(df, "data.dataset"))) if len(df) else []
    parts = [make_part(df[D.param(df, "data.dataset") == ds].reset_index(drop=True), ds,
                       f"_{ds}" if len(datasets) > 1 else "", pref_metric, pref_mode) for ds in datasets]

    doc = Doc()
    doc.h(1, f"Sweep `{sweep}`")
    header(doc, exp, df, uri, parts, scale_note)
    written_tables: list[Table] = []
    figures: list[Figure] = []
    if not len(df):
        doc.p("This experiment has no runs yet: nothing to tabulate.")
    for part in parts:
        t, f = report_part(doc, part, client, figures_dir, checkpoint_figures, multi=len(parts) > 1)
        written_tables += t
        figures += f
    for t in written_tables:
        t.write(tables_dir)
    (out / "report.md").write_text(doc.to_markdown())
    (out / "report.html").write_text(doc.to_html(out, f"Sweep {sweep}"))
    manifest = {"sweep": sweep, "experiment_id": exp.experiment_id, "tracking_uri": uri,
                "tables": sorted(t.name for t in written_tables),
                "figures": {f.name: {"file": f.file, "width": f.width, "height": f.height, "caption": f.caption}
                            for f in sorted(figures, key=lambda f: f.name)}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out / "report.md"


def _tag_value(df: pd.DataFrame, name: str) -> Optional[str]:
    vals = sorted({v for v in D.tag(df, name) if v})
    return vals[0] if len(vals) == 1 else None


def _values(series: pd.Series) -> str:
    vals = sorted({str(v) for v in series if str(v) not in ("", "nan")}, key=D.value_sort_key)
    return ", ".join(vals) if vals else "not recorded"


def header(doc: Doc, exp, df: pd.DataFrame, uri: str, parts: list[Part], scale_note: Optional[str]) -> None:
    """What stands behind the numbers: experiment, runs, commits, budget, samples, extractors, device."""
    status = D.run_status(df) if len(df) else pd.Series(dtype=str)
    counts = status.value_counts().to_dict()
    desc = _tag_value(df, "mlflow.note.content")
    doc.p("Generated by `ign-bench report` from MLflow alone (`reports/build.py`); every number below "
          "is a run's final evaluation as logged. Rebuild: `make report SWEEP=" + exp.name + "`.")
    items = [f"MLflow experiment: `{exp.name}` (id {exp.experiment_id}) at `{uri}`; artifacts at "
             f"`{exp.artifact_location}`",
             "Runs: " + (", ".join(f"{counts[s]} {s.lower()}" for s in sorted(counts)) or "none")
             + f" ({len(df)} in all)"]
    if desc:
        items.append(f"Sweep description: {desc}")
    if scale_note:
        items.append(f"Scale: {scale_note}")
    if len(df):
        commits = sorted({c for c in D.tag(df, "git_commit") if c})
        items.append("Git commit(s): " + (", ".join(f"`{c}`" for c in commits) or "not recorded"))
        dur = ((df["end_time"] - df["start_time"]).dt.total_seconds()
               if "end_time" in df and "start_time" in df else pd.Series(dtype=float))
        dur = dur[D.run_status(df) != "RUNNING"] if len(dur) else dur
        if dur.notna().any() and dur.sum() > 0:
            items.append(f"Run time: {dur.sum() / 60:.1f} min summed over runs (longest {dur.max() / 60:.1f} min)")
    for part in parts:
        d = part.df
        pre = f"[{part.dataset}] " if len(parts) > 1 else ""
        items.append(pre + f"Data set: `{part.dataset}`; model `{_model_names(d, part.dataset)}` "
                     f"(width {_values(D.param(d, 'model.width'))}, latent {_values(D.param(d, 'model.latent'))})"
                     if part.dataset not in ("ring8", "moons") else pre + f"Data set: `{part.dataset}` (2-D toy), "
                     f"MLP hidden {_values(D.param(d, 'model.hidden'))} × depth {_values(D.param(d, 'model.depth'))}")
        items.append(pre + f"Budget: {_values(D.param(d, 'train.steps'))} steps at batch size "
                     f"{_values(D.param(d, 'train.batch_size'))}, lr {_values(D.param(d, 'optim.lr'))}; "
                     f"{_n_seeds(d)}")
        n_metric = d["metrics.n_samples"] if "metrics.n_samples" in d else pd.Series(dtype=float)
        n_ref = _values(D.param(d, "eval.n_reference"))
        items.append(pre + f"Evaluation: {_values(n_metric.dropna().astype(int))} generated samples per k "
                     f"(eval.n_samples = {_values(D.param(d, 'eval.n_samples'))}) against "
                     + ("as many fresh samples of the distribution" if part.dataset in ("ring8", "moons") else
                        "as many real training images" if n_ref == "None" else f"{n_ref} real training images")
                     + ", "
                     f"k = 1..{_values(D.param(d, 'eval.k'))}, BatchNorm at evaluation: "
                     f"{_values(D.param(d, 'eval.bn_mode'))}, evaluation noise seed {_values(D.param(d, 'eval.seed'))}")
        if part.dataset not in ("ring8", "moons"):
            items.append(pre + "Feature extractors: " + extractor_text(d))
        else:
            items.append(pre + "Metrics: exact 2-D distances to fresh samples of the toy distribution "
                         "(sliced Wasserstein, energy distance, mode coverage); no feature extractor")
        dev = _values(D.param(d, "device"))
        got = _values(D.tag(d, "device"))  # what the trials actually ran on (tag written by the sweep)
        if got != "not recorded":
            items.append(pre + f"Device: `{got}` (config `device` = {dev})")
        else:
            items.append(pre + f"Device: `{dev}`" + (" (auto = CUDA when available, else CPU; the runs do not "
                                                       "record which one they got)" if dev == "auto" else ""))
        if part.metric:
            lab = part.labels.get(part.best, "—") if part.best is not None else "—"
            items.append(pre + f"Best configuration by mean `{part.metric}` ({part.mode}) over seeds: {lab}; "
                         f"best run in it: `{part.best_run}` (trial `{_trial(d, part.best_run)}`)")
    doc.ul(items)


def _model_names(d: pd.DataFrame, dataset: str) -> str:
    from harness.config import DEFAULT_MODEL  # model.name None = the data set's default model
    names = {DEFAULT_MODEL.get(dataset, "None") if v == "None" else v for v in D.param(d, "model.name")}
    return ", ".join(sorted(names))


def _n_seeds(d: pd.DataFrame) -> str:
    seeds = sorted(set(D.param(d, "seed")), key=D.value_sort_key)
    return f"{len(seeds)} seed(s) ({', '.join(seeds)})"


def _trial(d: pd.DataFrame, run_id: Optional[str]) -> str:
    if run_id is None:
        return "—"
    return D.tag(d, "trial_id")[d["run_id"] == run_id].iloc[0]


def extractor_text(d: pd.DataFrame) -> str:
    """Each extractor with its weights hash: Inception's from the runs' `inception_weights` tag;
    the digit classifier's from the local cache (read, never trained, at build time)."""
    names = set()
    for v in D.param(d, "eval.extractors"):
        parsed = D.parse_value(v)
        names.update(parsed if isinstance(parsed, tuple) else [str(parsed)])
    parts = []
    for name in sorted(names):
        if name == "inception":
            h = _values(D.tag(d, "inception_weights"))
            parts.append(f"inception (torch-fidelity inception-v3-compat 2048-d pool features; weights sha256[:12] "
                         f"`{h}` as logged by the runs)")
        elif name == "mnist":
            parts.append("mnist (the project's digit classifier: 128-d features, logits for IS and modes; "
                         + mnist_classifier_text(_values(D.tag(d, "mnist_weights"))) + ")")
        else:
            parts.append(name)
    return "; ".join(parts) or "not recorded"


def mnist_classifier_text(logged: str = "not recorded") -> str:
    """The classifier's weights hash as the runs logged it (tag `mnist_weights`), and its test
    accuracy when the local cache holds those same weights."""
    try:
        from harness.classifier import classifier_path, load_classifier
        path = classifier_path()
        info = load_classifier("cpu", path=path)[1] if path.exists() else None
    except Exception as e:  # the header must not fail a report
        info = None
        local = f"local classifier unreadable ({type(e).__name__})"
    else:
        local = "no cached classifier here" if info is None else f"local cache holds `{info['hash']}`"
    if logged == "not recorded":
        if info is None:
            return f"weights hash not recorded by the runs; {local}"
        return (f"weights sha256[:12] `{info['hash']}` and test accuracy {info['test_accuracy']:.4f} read from "
                f"the local cache at build time; the runs do not log it")
    if info is not None and info["hash"] == logged:
        return f"weights sha256[:12] `{logged}` as logged by the runs, test accuracy {info['test_accuracy']:.4f}"
    return f"weights sha256[:12] `{logged}` as logged by the runs (test accuracy ≥ 0.99 when trained; {local})"


def report_part(doc: Doc, part: Part, client, figures_dir: Path, checkpoint_figures: bool,
                multi: bool) -> tuple[list[Table], list[Figure]]:
    from . import figures as F
    tables: list[Table] = []
    figs: list[Figure] = []
    sfx = part.suffix
    if multi:
        doc.h(2, f"Data set `{part.dataset}`")
    lvl = 3 if multi else 2
    c = part.configs
    failed = part.df[D.run_status(part.df) != D.FINISHED]
    failed = failed.iloc[sorted(range(len(failed)), key=lambda i: (D.tag(failed, "trial_id").iloc[i],
                                                                    failed["run_id"].iloc[i]))]
    if len(failed):
        doc.h(lvl, "Gaps")
        doc.ul([f"trial `{D.tag(failed, 'trial_id').iloc[i] or failed['run_id'].iloc[i]}` "
                f"({part.labels.get(D.config_key(failed, c.axes).iloc[i], '')}): "
                f"{D.run_status(failed).iloc[i].lower()}" + (f": {D.tag(failed, 'error').iloc[i]}"
                                                             if D.tag(failed, "error").iloc[i] else "")
                for i in range(len(failed))])
    missing = [m for m in c.metrics if (c.table[f"{m}_n"] < c.table["n"]).any()]
    if missing:
        doc.p("Metrics some finished runs did not log (their cells show the count `(n=…)` or —): "
              + ", ".join(f"`{m}`" for m in missing) + ".")

    # Table 1
    best_row = part.df[part.df["run_id"] == part.best_run].iloc[0] if part.best_run else None
    doc.h(lvl, "Table 1, regenerated")
    cfg = None
    if best_row is not None:
        try:
            cfg = config_from_params(best_row)
        except Exception as e:
            doc.p(f"{MISSING} skipped: the best run's params do not rebuild a config ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200]}).")
    if cfg is not None:
        arch, hyp = table1(cfg, f"run {_trial(part.df, part.best_run)} ({part.labels.get(part.best, '')})",
                           _values(D.param(part.df[part.df['run_id'] == part.best_run], "device")))
        arch.name += sfx
        hyp.name += sfx
        doc.p("From the best run's resolved config (its MLflow params); the architecture is read off the model "
              "that `ign.build_model` builds for that config, module by module.")
        for t in (arch, hyp):
            doc.table(t)
            tables.append(t)
    elif best_row is None:
        doc.p(f"{MISSING} no finished run with metrics: Table 1 needs a run's config.")

    # k-table of the best configuration
    doc.h(lvl, "The best configuration at every k")
    if part.best is not None:
        for t in k_tables(c, part.best, part.labels[part.best], sfx):
            doc.table(t)
            tables.append(t)
    else:
        doc.p(f"{MISSING} no configuration has a value of the selection metric.")

    # ablations
    doc.h(lvl, "Ablations, one table per swept axis")
    if not c.axes:
        doc.p("Nothing was swept apart from seeds: no ablation tables.")
    for axis in c.axes:
        t = ablation_table(c, axis, part.reference)
        if t is None:
            continue
        t.name += sfx
        doc.table(t)
        tables.append(t)
        f = F.fig_metric_vs_axis(c, axis, figures_dir, name=f"vs_{axis.replace('.', '_')}{sfx}")
        if f:
            doc.figure(f)
            figs.append(f)

    doc.h(lvl, "Every configuration against k")
    f = F.fig_metric_vs_k(c, part.labels, figures_dir, name=f"metric_vs_k{sfx}")
    if f:
        doc.figure(f)
        figs.append(f)
    else:
        doc.p(f"{MISSING} no metric at several k was logged.")

    doc.h(lvl, "Training curves")
    run_ids = sorted(part.df["run_id"])
    hist = metric_histories(client, run_ids)
    keys = D.config_key(part.df, c.axes)
    run_config = dict(zip(part.df["run_id"], keys))
    f = F.fig_training_curves(hist, run_config, part.labels, figures_dir, name=f"training_curves{sfx}")
    if f:
        doc.figure(f)
        figs.append(f)
    else:
        doc.p(f"{MISSING} no training losses were logged.")

    # projection benchmark, when the runs logged it
    if best_row is not None:
        metrics = {k[len("metrics."):]: float(v) for k, v in best_row.items()
                   if k.startswith("metrics.proj_") and isinstance(v, float) and not math.isnan(v)}
        t = projection_tables(metrics, f"run {_trial(part.df, part.best_run)}")
        latent = {k[len("metrics."):]: float(v) for k, v in best_row.items()
                  if k.startswith(("metrics.interp_", "metrics.arith_", "metrics.judge_"))
                  and isinstance(v, float) and not math.isnan(v)}
        if t is not None or latent:
            doc.h(lvl, "Projection and latent operations (best run)")
        if t is not None:
            t.name += sfx
            doc.table(t)
            tables.append(t)
        if latent:
            doc.p("Latent operations measured by the run (harness.project: interpolation smoothness = path "
                  "length / chord in feature space; arithmetic success = share of edits judged to have the attribute):")
            doc.ul([f"`{k}` = {v:.4g}" for k, v in sorted(latent.items())])

    # the paper's figures from the best checkpoint
    doc.h(lvl, "The paper's figures, from the best run's checkpoint")
    if part.best_run is None:
        doc.p(f"{MISSING} skipped: no finished run.")
    elif not checkpoint_figures:
        doc.p("Skipped (built with checkpoint_figures=False).")
    else:
        figs += checkpoint_section(doc, part, client, figures_dir)

    doc.h(lvl, "Every run")
    t = runs_table(part.df, c.axes, c.metrics, name=f"runs{sfx}")
    doc.table(t)
    tables.append(t)
    return tables, figs


# ---------------------------------------------------------------------------------------------
# Figures from the checkpoint.

def fetch_checkpoint(client, run_id: str, trial_dir: str, tmp: Path) -> Optional[Path]:
    """The run's checkpoint file: its MLflow artifact, else the newest in its trial folder."""
    from harness.checkpoint import list_checkpoints
    try:
        local = Path(client.download_artifacts(run_id, "checkpoint", str(tmp)))
        found = sorted(local.glob("*.pt"))
        if found:
            return found[-1]
    except Exception as e:
        log.warning("checkpoint artifact of %s: %s", run_id, e)
    if trial_dir:
        found = list_checkpoints(Path(trial_dir) / "checkpoints")
        if found:
            return found[-1]
    return None


def checkpoint_section(doc: Doc, part: Part, client, figures_dir: Path) -> list[Figure]:
    from . import figures as F
    run_id = part.best_run
    row = part.df[part.df["run_id"] == run_id].iloc[0]
    trial = _trial(part.df, run_id)
    sfx = part.suffix
    figs: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="ign-report-") as tmp:
        ck = fetch_checkpoint(client, run_id, D.tag(part.df[part.df["run_id"] == run_id], "trial_dir").iloc[0], Path(tmp))
        if ck is None:
            doc.p(f"{MISSING} skipped: run `{run_id}` has no checkpoint artifact and its trial folder is gone.")
            return logged_samples(doc, client, run_id, figures_dir, sfx)
        try:
            model = load_model(ck, f"trial {trial}, {part.labels.get(part.best, '')}")
        except Exception as e:
            doc.p(f"{MISSING} skipped: could not load the checkpoint or its data ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200]}).")
            return logged_samples(doc, client, run_id, figures_dir, sfx)
    K = int(D.parse_value(row.get("params.eval.k", "3")) or 3)
    doc.p(f"Run `{run_id}` (trial `{trial}`), step {model.step}; forward passes on CPU with BatchNorm in "
          f"`{model.bn_mode}` mode (small figure batches are padded with extra noise to {F.BN_PAD} samples "
          "so batch statistics are those of a batch).")
    made = [F.fig_fk_rows(model, figures_dir, k=max(3, min(K, 4)))]
    made += F.fig_uncurated(model, figures_dir, k=4)
    if model.data.is_image:
        rgb = model.data.shape[0] == 3
        tasks = ("noise", "grayscale", "sketch") if rgb else ("noise",)
        made.append(F.fig_projection(model, figures_dir, tasks))
        if not rgb:
            doc.p("Fig. 5 on 1-channel data shows the noise task only: grayscale is the identity on grayscale "
                  "digits, and the paper's sketch operator is defined for photographs.")
    else:
        doc.p("Figs. 5 and 6 (projection of degraded images, latent arithmetic) need images: skipped for 2-D data.")
    made.append(F.fig_interpolation(model, figures_dir))
    if model.cfg.data.dataset == "celeba64":
        fig, rule = arithmetic_figure(model, figures_dir)
        if fig is None:
            doc.p(f"Fig. 6 {rule}.")
        else:
            made.append(fig)
    elif model.data.is_image:
        doc.p(f"Fig. 6 (latent arithmetic on CelebA-64 by the Eyeglasses attribute) skipped: this data set is "
              f"`{model.cfg.data.dataset}`, which has no face attributes.")
    for f in made:
        if sfx:
            new = f.name + sfx
            (figures_dir / f"{f.name}.png").rename(figures_dir / f"{new}.png")
            f.name = new
        doc.figure(f)
        figs.append(f)
    return figs


def load_model(ck: Path, label: str):
    """The figures' Model (harness.trial.load_trained on CPU, the run's data and noise source)."""
    import torch
    from harness.data import load_dataset
    from harness.evaluate import make_noise
    from harness.trial import load_trained
    from .figures import Model
    f, cfg, raw = load_trained(ck, device="cpu")
    data = load_dataset(cfg.data.dataset, cfg.data.root, False, cfg.data.image_size, cfg.seed)
    if cfg.data.limit:  # the trial's noise statistics were fitted on the limited set
        data.train = data.train[:cfg.data.limit]
        if data.train_labels is not None:
            data.train_labels = data.train_labels[:cfg.data.limit]
    torch.manual_seed(0)
    noise = make_noise(cfg, data, "cpu")
    bn = cfg.eval.bn_mode if cfg.eval.bn_mode != "both" else "train"
    return Model(f.eval(), cfg, data, noise, bn, label, raw.get("step"))


def arithmetic_figure(model, figures_dir: Path):
    from . import figures as F
    try:
        from harness.project import celeba_attribute, nearest_labels
        train_labels, _ = celeba_attribute("Eyeglasses", model.cfg.data.root)
        if len(train_labels) != len(model.data.train):
            return None, f"skipped: {len(train_labels)} Eyeglasses labels for {len(model.data.train)} training faces"
    except Exception as e:
        return None, f"skipped: no Eyeglasses labels ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return F.fig_arithmetic(model, figures_dir, lambda imgs: nearest_labels(imgs, model.data.train, train_labels))


def logged_samples(doc: Doc, client, run_id: str, figures_dir: Path, sfx: str) -> list[Figure]:
    """Fallback without a checkpoint: the sample grids the trial itself logged."""
    figs = []
    with tempfile.TemporaryDirectory(prefix="ign-report-") as tmp:
        try:
            local = Path(client.download_artifacts(run_id, "samples", tmp))
        except Exception:
            return []
        for p in sorted(local.glob("*.png")):
            name = f"logged_{p.stem}{sfx}"
            shutil.copy(p, figures_dir / f"{name}.png")
            w, h = png_size(figures_dir / f"{name}.png")
            f = Figure(name, f"The sample grid the trial logged ({p.name}).", w, h)
            doc.figure(f)
            figs.append(f)
    return figs


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; ValueError if the file is not a PNG."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"figure: {path} is not a PNG")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


# ---------------------------------------------------------------------------------------------
# `make paper`: what the paper's artefacts need, at the scale this machine allows.

# sweeps/paper.yaml cut to a CPU budget (used when there is no GPU). Each line says why; the
# whole diff is written into the sweep's description, so every report of it states its scale.
PAPER_CPU_NAME = "paper-cpu"
PAPER_CPU_BASE = {
    "train.ckpt_every": 50,        # a checkpoint every 50 steps: an interrupted run loses little
    "eval.every": 0,               # final evaluation only: Inception on CPU is ~20 images/s
    "eval.n_samples": 250,         # per k; FID at 250 samples is biased high: compare runs, not papers
    "eval.batch_size": 125,
}
PAPER_CPU_VARIANTS = {             # per data set: replaces the variant's budget keys
    "mnist": {"train.steps": 500},                     # mnist-code preset: width 32, batch 64 (~0.2 s/step)
    "celeba64": {"train.steps": 150, "train.batch_size": 32},  # Table 1's network at batch 32 (~3-9 s/step on 2 cores)
}
PAPER_CPU_DROP = ("train.batch_size", "model.width", "model.latent", "optim.lr")  # back to the presets' CPU sizes
PAPER_CPU_SEEDS = [0]              # one seed: a CPU cannot afford three


def paper_spec(gpu: bool):
    """The spec `make paper` runs: sweeps/paper.yaml on a GPU; on CPU, the same variants with the
    PAPER_CPU_* budget (name `paper-cpu`, one seed, one CPU per trial)."""
    from harness.sweep import SweepSpec, load_spec, validate_against_config
    spec = load_spec("paper")
    if gpu:
        return spec
    raw = spec.model_dump()
    raw["name"] = PAPER_CPU_NAME
    raw["base"] = {**raw["base"], **PAPER_CPU_BASE}
    variants = []
    for v in raw["variants"]:
        v = {k: x for k, x in v.items() if k not in PAPER_CPU_DROP}
        variants.append({**v, **PAPER_CPU_VARIANTS.get(v.get("data.dataset"), {})})
    raw["variants"] = variants
    raw["space"] = {**raw["space"], "seed": {"grid": PAPER_CPU_SEEDS}}
    raw["resources"] = {"cpu": 1, "gpu": 0}
    raw["max_concurrent"] = 2
    raw["description"] = ("Reduced CPU scale of sweeps/paper.yaml (make paper without a GPU): base "
                          + json.dumps(PAPER_CPU_BASE, sort_keys=True) + "; per data set "
                          + json.dumps(PAPER_CPU_VARIANTS, sort_keys=True) + "; variants drop "
                          + ", ".join(PAPER_CPU_DROP) + " (preset CPU sizes); seeds " + str(PAPER_CPU_SEEDS))
    spec = SweepSpec.model_validate(raw)
    validate_against_config(spec)
    return spec


def expected_trials(spec) -> int:
    n = max(1, len(spec.variants))
    for dist in spec.space.values():
        kind, values = next(iter(dist.items()))
        if kind == "grid":
            n *= len(values)
    return n * spec.num_samples


def finished_trials(name: str, tracking_uri: Optional[str] = None) -> int:
    from mlflow.tracking import MlflowClient
    from harness.tracking import tracking_uri as default_uri
    client = MlflowClient(tracking_uri=tracking_uri or default_uri())
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return 0
    runs = client.search_runs([exp.experiment_id], max_results=100000)
    return len({r.data.tags.get("trial_id") for r in runs if r.info.status == D.FINISHED})


def make_paper(out_dir: Optional[str | Path] = None, device: str = "auto", dry_run: bool = False,
               storage: Optional[str | Path] = None) -> Optional[Path]:
    """Run what is missing for the paper's artefacts, then build that sweep's report.

    device: "auto" (GPU when there is one), "cuda" (sweeps/paper.yaml: full scale) or "cpu"
        (paper_spec(gpu=False): the reduced budget, stated in the report's header).
    dry_run: print the plan (spec, trials done / expected) and run nothing; returns None.
    storage: the Ray results folder (default as `ign-bench sweep`).
    Returns the path of the report.md. A sweep whose trials have all finished is not run again;
    a partial one is resumed (harness.sweep.run_sweep)."""
    import torch
    from harness.sweep import check_resources, print_summary, run_sweep
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: unknown value {device!r}; allowed: auto, cpu, cuda")
    gpu = torch.cuda.is_available() if device == "auto" else device == "cuda"
    spec = paper_spec(gpu)
    want, done = expected_trials(spec), finished_trials(spec.name)
    scale = ("full scale: sweeps/paper.yaml on a GPU" if gpu else
             f"reduced CPU scale: {spec.description}")
    plan = {"sweep": spec.name, "device": "cuda" if gpu else "cpu", "trials_expected": want,
            "trials_finished": done, "will_run": done < want, "scale": scale,
            "out": str(Path(out_dir) if out_dir else REPORTS_DIR / spec.name)}
    print(json.dumps(plan, indent=2), file=sys.stderr)
    if dry_run:
        return None
    if done < want:
        check_resources(spec)
        print_summary(run_sweep(spec, storage=Path(storage) if storage else None))
    return build_report(spec.name, out_dir, scale_note=scale)


# ---------------------------------------------------------------------------------------------
# CLI.

def cmd_report(args) -> int:
    path = build_report(args.sweep, args.out, args.tracking_uri, checkpoint_figures=not args.no_checkpoint_figures)
    print(path)
    print(f"self-contained HTML: {path.with_suffix('.html')}", file=sys.stderr)
    return 0


def cmd_paper(args) -> int:
    path = make_paper(args.out, args.device, args.dry_run, args.storage)
    if path:
        print(path)
    return 0


def add_cli(subparsers) -> None:
    """Register `report [SWEEP] [--out DIR]` and `paper [--device] [--dry-run]`."""
    p = subparsers.add_parser(
        "report", help="tables and figures of one sweep's MLflow experiment into reports/<sweep>/",
        description="Build reports/<SWEEP>/ (report.md, self-contained report.html, tables/*.csv|md|tex, "
                    "figures/*.png) from the sweep's MLflow experiment. Trains nothing; the paper's figures "
                    "come from forward passes of the best run's checkpoint.")
    p.add_argument("sweep", nargs="?", default="default", help="sweep = MLflow experiment name [default: default]")
    p.add_argument("--out", default=None, help="output folder [default: reports/<sweep>]")
    p.add_argument("--tracking-uri", default=None, help="MLflow store [default: $MLFLOW_TRACKING_URI or ./mlflow.db]")
    p.add_argument("--no-checkpoint-figures", action="store_true",
                   help="skip the figures that need the best run's checkpoint (faster)")
    p.set_defaults(func=cmd_report)
    q = subparsers.add_parser(
        "paper", help="run what the paper's artefacts still need (full on GPU, reduced on CPU), then report",
        description="Run sweeps/paper.yaml on a GPU, or its reduced CPU version (sweep paper-cpu) without one, "
                    "skipping trials that already finished, then build its report. The scale is written in "
                    "the report's header.")
    q.add_argument("--device", default="auto", help="auto, cpu or cuda [default: auto]")
    q.add_argument("--out", default=None, help="report folder [default: reports/<sweep>]")
    q.add_argument("--storage", default=None, help="Ray results folder [default: as `ign-bench sweep`]")
    q.add_argument("--dry-run", action="store_true", help="print the plan and run nothing")
    q.set_defaults(func=cmd_paper)
