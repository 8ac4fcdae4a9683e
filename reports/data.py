"""One sweep's MLflow runs as pandas, and the pure logic the tables and figures share.

Everything here works on the DataFrame that `mlflow.search_runs` returns (columns `run_id`,
`status`, `params.<key>`, `metrics.<key>`, `tags.<key>`, `start_time`, `end_time`), so the table
logic can be tested on a small hand-made frame and runs unchanged on a real store.

Vocabulary:
- axis: a swept config key other than `seed` (the runs' `swept` tag) whose value varies;
- configuration: one combination of axis values; its runs are seeds (replicates);
- one-factor group: configurations that differ in one axis only (the rows of that axis's table).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

# The ablation axes in the order the report shows them (issue 5); any other swept key follows.
AXIS_ORDER = ("loss.lambda_tight", "loss.clamp_ratio", "loss.distance", "noise.name",
              "loss.clamp_reference", "noise.fft_stats", "loss.tight_warmup")
AXIS_LABELS = {"loss.lambda_tight": "λt", "loss.clamp_ratio": "clamp a", "loss.distance": "distance D",
               "noise.name": "noise", "loss.clamp_reference": "clamp reference",
               "noise.fft_stats": "FFT statistics", "loss.tight_warmup": "λt warm-up (steps)",
               "loss.lambda_rec": "λr", "loss.lambda_idem": "λi", "data.dataset": "data set"}
REPLICATE_KEYS = ("seed",)        # swept keys that are repeats, not factors
EXTRACTORS = ("mnist", "inception")

# Which way is better, by metric family (the name without extractor, k and BN suffix).
LOWER_BETTER = ("fid", "kid", "swd", "energy", "idem", "drift")
HIGHER_BETTER = ("precision", "recall", "is", "modes", "modes_entropy", "near_frac",
                 "psnr", "ssim", "acc")
# Evaluation keys that are not results: bookkeeping, or the spread of another column's estimator.
NOT_RESULTS = ("n_samples", "eval_time_s", "train_time_s", "step")
ESTIMATOR_SPREAD = ("kid_std", "is_std")
_K = re.compile(r"^(?P<base>.+)_k(?P<k>\d+)(?P<bn>_bneval)?$")

FAILED, FINISHED = "FAILED", "FINISHED"


# ---------------------------------------------------------------------------------------------
# Metric names.

@dataclass(frozen=True)
class MetricKey:
    """A flat MLflow metric key split into its parts: `fid_mnist_k2_bneval` -> base `fid_mnist`,
    family `fid`, extractor `mnist`, k 2, bn `_bneval`. Keys without `_k<k>` have k None."""
    key: str
    base: str
    family: str
    extractor: str
    k: Optional[int]
    bn: str

    @property
    def direction(self) -> Optional[str]:
        if self.family in LOWER_BETTER:
            return "min"
        if self.family in HIGHER_BETTER:
            return "max"
        return None

    @property
    def column(self) -> str:
        """The key without its k: what a group of k-columns is called (`fid_mnist`, `drift_real`)."""
        return self.base + self.bn


def parse_metric(key: str) -> MetricKey:
    m = _K.match(key)
    base, k, bn = (m["base"], int(m["k"]), m["bn"] or "") if m else (key, None, "")
    if k is None and key.endswith("_bneval"):
        base, bn = key[:-len("_bneval")], "_bneval"
    parts = base.split("_")
    extractor = parts[-1] if len(parts) > 1 and parts[-1] in EXTRACTORS else ""
    family = "_".join(parts[:-1]) if extractor else base
    if family == "drift_real":
        family = "drift"
    return MetricKey(key, base, family, extractor, k, bn)


def result_metrics(df: pd.DataFrame) -> list[str]:
    """The evaluation results among a runs frame's metrics (no training losses, bookkeeping,
    estimator spreads or projection keys; none that no run logged), sorted by (column, k)."""
    keys = []
    for col in df.columns:
        if not col.startswith("metrics.") or df[col].isna().all():
            continue
        key = col[len("metrics."):]
        if "/" in key or key in NOT_RESULTS or key.startswith(("proj_", "arith_", "interp_", "judge_")):
            continue
        mk = parse_metric(key)
        if mk.family in ESTIMATOR_SPREAD or mk.base in ESTIMATOR_SPREAD:
            continue
        if any(mk.base.startswith(s + "_") for s in ESTIMATOR_SPREAD):
            continue
        keys.append(key)
    return sorted(keys, key=metric_sort_key)


FAMILY_ORDER = ("fid", "kid", "precision", "recall", "is", "swd", "energy", "modes", "modes_entropy",
                "near_frac", "idem", "drift")


def metric_sort_key(key: str) -> tuple:
    mk = parse_metric(key)
    fam = FAMILY_ORDER.index(mk.family) if mk.family in FAMILY_ORDER else len(FAMILY_ORDER)
    ext = EXTRACTORS.index(mk.extractor) if mk.extractor in EXTRACTORS else len(EXTRACTORS)
    return (mk.bn, ext, fam, mk.family, -1 if mk.k is None else mk.k)


def metric_label(column: str) -> str:
    """Display name of a metric column: `fid_mnist` -> `FID (mnist)`, `drift_real` -> `drift`."""
    mk = parse_metric(column)
    names = {"fid": "FID", "kid": "KID", "precision": "precision", "recall": "recall", "is": "IS",
             "modes": "modes", "modes_entropy": "mode entropy", "swd": "SWD", "energy": "energy dist.",
             "near_frac": "near frac.", "idem": "idem", "drift": "drift"}
    text = names.get(mk.family, mk.family)
    if mk.extractor:
        text += f" ({mk.extractor})"
    if mk.bn:
        text += " [BN eval]"
    return text


# ---------------------------------------------------------------------------------------------
# Values.

def parse_value(text: Any) -> Any:
    """A param string as a value: None, bool, int, float, a JSON list (as a tuple), else the string."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    if not isinstance(text, str):
        return text
    if text in ("None", "null"):
        return None
    if text in ("True", "False"):
        return text == "True"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.startswith("["):
        try:
            return tuple(json.loads(text))
        except json.JSONDecodeError:
            pass
    return text


def value_sort_key(text: Any) -> tuple:
    """Sort axis values: None first, then numbers by value, then everything else as text."""
    v = parse_value(text)
    if v is None:
        return (0, 0.0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (1, float(v), "")
    return (2, 0.0, str(v))


def format_value(text: Any) -> str:
    """An axis value as shown in tables: `None` -> `none`, floats without trailing noise."""
    v = parse_value(text)
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    return str(v)


# ---------------------------------------------------------------------------------------------
# Runs -> configurations.

def run_status(df: pd.DataFrame) -> pd.Series:
    return df["status"].fillna("UNKNOWN") if "status" in df else pd.Series(FINISHED, index=df.index)


def tag(df: pd.DataFrame, name: str, default: str = "") -> pd.Series:
    col = f"tags.{name}"
    return df[col].fillna(default).astype(str) if col in df else pd.Series(default, index=df.index)


def param(df: pd.DataFrame, key: str) -> pd.Series:
    col = f"params.{key}"
    return df[col].astype(object).where(df[col].notna(), "None") if col in df else pd.Series("None", index=df.index)


def swept_keys(df: pd.DataFrame) -> list[str]:
    """Every key named in any run's `swept` tag (replicates included), sorted."""
    keys: set[str] = set()
    for s in tag(df, "swept"):
        keys.update(k for k in s.split(",") if k)
    return sorted(keys)


def axes_of(df: pd.DataFrame) -> list[str]:
    """The factors of a set of runs: swept keys other than replicates whose value varies, in
    AXIS_ORDER first, then alphabetical."""
    axes = [k for k in swept_keys(df) if k not in REPLICATE_KEYS and f"params.{k}" in df
            and param(df, k).nunique() > 1]
    return sorted(axes, key=lambda k: (AXIS_ORDER.index(k) if k in AXIS_ORDER else len(AXIS_ORDER), k))


def is_one_factor(df: pd.DataFrame) -> bool:
    """True when the runs come from one-factor variants (their `swept` tags differ), False for a
    grid or a search (every run sweeps the same keys)."""
    return tag(df, "swept").map(lambda s: frozenset(k for k in s.split(",") if k)).nunique() > 1


def config_key(df: pd.DataFrame, axes: list[str]) -> pd.Series:
    """Each run's configuration as a tuple of axis value strings (params as MLflow stores them)."""
    if not axes:
        return pd.Series([()] * len(df), index=df.index, dtype=object)
    cols = [param(df, a).astype(str) for a in axes]
    return pd.Series(list(zip(*cols)), index=df.index, dtype=object)


@dataclass
class Configs:
    """The configurations of a set of runs with each metric's mean, std and count over finished
    runs (`table`, one row per configuration, sorted by axis values), and how runs failed."""
    axes: list[str]
    metrics: list[str]
    table: pd.DataFrame                       # columns: key, <axis>..., n, n_failed, note, <m>, <m>_std, <m>_n
    runs: dict[tuple, list[str]] = field(default_factory=dict)   # config key -> run ids

    def row(self, key: tuple) -> pd.Series:
        return self.table.loc[self.table["key"].map(lambda k: k == key)].iloc[0]


def aggregate(df: pd.DataFrame, axes: list[str], metrics: Optional[list[str]] = None) -> Configs:
    """Group runs into configurations; every metric's mean, std (ddof 1; NaN for one run) and
    count over the configuration's FINISHED runs. A configuration none of whose runs finished
    keeps its row with n = 0 and `note` "failed: <first error>" (or the statuses)."""
    metrics = result_metrics(df) if metrics is None else metrics
    keys = config_key(df, axes)
    status = run_status(df)
    errors = tag(df, "error")
    rows, members = [], {}
    for key in sorted(set(keys), key=lambda t: tuple(value_sort_key(v) for v in t)):
        sel = keys.map(lambda k: k == key)
        part = df[sel]
        ok = part[status[sel] == FINISHED]
        members[key] = sorted(part["run_id"]) if "run_id" in part else []
        row: dict[str, Any] = {"key": key, **dict(zip(axes, key)), "n": len(ok),
                               "n_failed": int((status[sel] == FAILED).sum())}
        bad = part[status[sel] != FINISHED]
        row["note"] = _failure_note(bad, status[bad.index], errors[bad.index])
        for m in metrics:
            col = f"metrics.{m}"
            vals = ok[col].dropna().astype(float).to_numpy() if col in ok else np.array([])
            row[m] = float(vals.mean()) if len(vals) else math.nan
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
            row[f"{m}_n"] = int(len(vals))
        rows.append(row)
    cols = ["key", *axes, "n", "n_failed", "note"] + [c for m in metrics for c in (m, f"{m}_std", f"{m}_n")]
    return Configs(axes, metrics, pd.DataFrame(rows, columns=cols), members)


def _failure_note(bad: pd.DataFrame, status: pd.Series, errors: pd.Series) -> str:
    if bad.empty:
        return ""
    parts = []
    for st in sorted(set(status)):
        idx = status[status == st].index
        what = {FAILED: "failed", "RUNNING": "unfinished (RUNNING)", "KILLED": "killed"}.get(st, st.lower())
        errs = sorted({e for e in errors[idx] if e})
        text = f"{len(idx)} {what}" + (f": {errs[0]}" if errs else "")
        parts.append(text)
    return "; ".join(parts)


def one_factor_groups(table: pd.DataFrame, axis: str, axes: list[str]) -> list[list[int]]:
    """Row positions of `table` (Configs.table) grouped so that the rows of a group differ only in
    `axis`; groups with a single configuration are dropped. Ordered by the other axes' values,
    rows within a group by the axis value."""
    others = [a for a in axes if a != axis]
    groups: dict[tuple, list[int]] = {}
    for pos, (_, row) in enumerate(table.iterrows()):
        groups.setdefault(tuple(str(row[a]) for a in others), []).append(pos)
    out = []
    for key in sorted(groups, key=lambda t: tuple(value_sort_key(v) for v in t)):
        rows = sorted(groups[key], key=lambda p: value_sort_key(table.iloc[p][axis]))
        if len({str(table.iloc[p][axis]) for p in rows}) > 1:
            out.append(rows)
    return out


def reference_key(df: pd.DataFrame, configs: Configs) -> Optional[tuple]:
    """The baseline of one-factor variants: the configuration of the runs that sweep no factor
    (the empty variant); else each axis's most common value among configurations (ties: the
    first value in sort order), if that configuration exists. None when there is none."""
    axes = configs.axes
    if not axes:
        return ()
    keys = config_key(df, axes)
    swept = tag(df, "swept").map(lambda s: {k for k in s.split(",") if k} - set(REPLICATE_KEYS))
    plain = keys[swept.map(len) == 0]
    if len(plain):
        return sorted(set(plain))[0]
    t = configs.table
    mode = []
    for a in axes:
        counts = t[a].astype(str).value_counts()
        top = counts[counts == counts.max()].index
        mode.append(sorted(top, key=value_sort_key)[0])
    mode = tuple(mode)
    return mode if any(k == mode for k in t["key"]) else None


def best_key(configs: Configs, metric: str, mode: str) -> Optional[tuple]:
    """The configuration with the best mean of `metric` (ties: the first in sort order)."""
    t = configs.table
    if metric not in t or t[metric].isna().all():
        return None
    vals = t[metric] if mode == "min" else -t[metric]
    return t.loc[vals.idxmin(), "key"]


def best_run(df: pd.DataFrame, run_ids: Iterable[str], metric: str, mode: str) -> Optional[str]:
    """The finished run among `run_ids` with the best `metric` (ties: the smallest run id)."""
    col = f"metrics.{metric}"
    part = df[df["run_id"].isin(list(run_ids)) & (run_status(df) == FINISHED)]
    if col not in part or part[col].isna().all():
        return None
    part = part.dropna(subset=[col]).sort_values("run_id")
    vals = part[col] if mode == "min" else -part[col]
    return part.loc[vals.idxmin(), "run_id"]


SELECTION_PREFERENCE = ("fid_inception_k1", "fid_mnist_k1", "swd_k1", "energy_k1", "drift_real")


def selection_metric(df: pd.DataFrame, preferred: Optional[str] = None,
                     mode: Optional[str] = None) -> tuple[Optional[str], str]:
    """(metric, mode) that picks the best configuration: `preferred` (the sweep's own metric)
    when the runs report it, else the first of SELECTION_PREFERENCE they report."""
    have = {c[len("metrics."):] for c in df.columns if c.startswith("metrics.") and df[c].notna().any()}
    for m in ([preferred] if preferred else []) + list(SELECTION_PREFERENCE):
        if m in have:
            d = mode if (m == preferred and mode) else (parse_metric(m).direction or "min")
            return m, d
    return None, "min"
