"""Figures (matplotlib Agg, PNG at a fixed size and DPI, labelled axes).

Two kinds: plots of logged numbers (metric vs k, metric vs each axis, training curves), and the
paper's figures regenerated from a saved model with forward passes only (Figs. 4/7/8, 11-14, 5, 6
and an interpolation strip; scatter plots for 2-D toy data). Every `fig_*` function writes one PNG
and returns a `Figure` record (file, caption, pixel size); nothing here trains.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .data import Configs, format_value, metric_label, one_factor_groups, parse_metric, parse_value  # noqa: E402
from .tables import axis_label  # noqa: E402

DPI = 100
WIDTH_IN = 12.0              # every figure is 1200 px wide
PNG_META = {"Software": None}  # no matplotlib version in the file: the same figure is the same bytes
GRID_N = 64                  # uncurated grids: 8 x 8 (Figs. 11-14)
ROW_COLS = 12                # Fig. 4/7/8 rows: 12 noise samples
BN_PAD = 64                  # train-mode BN: generate in batches of at least this many (see pad_batch)


@dataclass
class Figure:
    name: str        # file stem under figures/
    caption: str
    width: int       # pixels
    height: int

    @property
    def file(self) -> str:
        return f"figures/{self.name}.png"


def _save(fig, folder: Path, name: str, caption: str, palette: bool = True) -> Figure:
    """Write the figure as figures/<name>.png at DPI. Plots are stored with a 256-colour palette
    (a third of the bytes, no visible change: a report with every figure inlined stays small);
    `palette=False` keeps full colour (image grids)."""
    import io
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    w, h = fig.get_size_inches()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_META)
    plt.close(fig)
    path = folder / f"{name}.png"
    if palette:
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        img.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, "PNG", optimize=True)
    else:
        path.write_bytes(buf.getvalue())
    return Figure(name, caption, int(round(w * DPI)), int(round(h * DPI)))


def _grid_shape(n: int, cols: int = 3) -> tuple[int, int]:
    cols = min(cols, max(n, 1))
    return int(math.ceil(n / cols)), cols


def _k_columns(configs: Configs) -> dict[str, dict[int, str]]:
    """metric column (e.g. fid_mnist) -> {k: key}, for metrics reported at several k."""
    out: dict[str, dict[int, str]] = {}
    for m in configs.metrics:
        mk = parse_metric(m)
        if mk.k is not None:
            out.setdefault(mk.column, {})[mk.k] = m
    return out


# ---------------------------------------------------------------------------------------------
# Plots of logged numbers.

def fig_metric_vs_k(configs: Configs, labels: dict[tuple, str], folder: Path, name: str = "metric_vs_k") -> Optional[Figure]:
    """One panel per metric: its mean over seeds (error bars: std) against k, a line per configuration."""
    cols = _k_columns(configs)
    if not cols:
        return None
    rows, ncol = _grid_shape(len(cols))
    fig, axes = plt.subplots(rows, ncol, figsize=(WIDTH_IN, 3.2 * rows + 0.8), squeeze=False)
    t = configs.table
    for ax, (col, ks) in zip(axes.flat, cols.items()):
        kk = sorted(ks)
        for i, (_, row) in enumerate(t.iterrows()):
            y = np.array([row[ks[k]] for k in kk], dtype=float)
            e = np.array([row[f"{ks[k]}_std"] for k in kk], dtype=float)
            if np.isnan(y).all():
                continue
            ax.errorbar(kk, y, yerr=np.nan_to_num(e), marker="o", ms=3, capsize=2, lw=1,
                        color=f"C{i % 10}", ls="-" if i < 10 else "--", label=labels.get(row["key"], str(row["key"])))
        ax.set_xticks(kk)
        ax.set_xlabel("k (applications of f)")
        ax.set_ylabel(metric_label(col))
        ax.set_title(metric_label(col), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    handles, labs = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labs, loc="lower center", ncol=min(4, len(labs)), fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.9 if rows == 1 else 0.92,
                        bottom=0.08 + 0.03 * math.ceil(len(labs) / 4) / rows,
                        hspace=0.45, wspace=0.3)
    fig.suptitle("Every metric at f^k, per configuration (mean ± std over seeds)", fontsize=11)
    return _save(fig, folder, name, "Every metric against k (f^k(z) for k = 1..K), one line per configuration; "
                                    "error bars: std over seeds.")


def fig_metric_vs_axis(configs: Configs, axis: str, folder: Path, ks: Sequence[int] = (1, 2, 3),
                       name: Optional[str] = None) -> Optional[Figure]:
    """One panel per metric: its mean against the values of `axis` over the configurations that
    differ only in `axis` (a line per k and per group of such configurations)."""
    t = configs.table
    groups = one_factor_groups(t, axis, configs.axes)
    if not groups:
        return None
    cols = _k_columns(configs)
    flat = [m for m in configs.metrics if parse_metric(m).k is None]
    panels = list(cols) + flat
    values = sorted({str(t.iloc[p][axis]) for g in groups for p in g}, key=lambda v: _axis_pos_key(v))
    numeric = all(isinstance(parse_value(v), (int, float)) and not isinstance(parse_value(v), bool) for v in values)
    pos = {v: (float(parse_value(v)) if numeric else i) for i, v in enumerate(values)}
    rows, ncol = _grid_shape(len(panels))
    fig, axes = plt.subplots(rows, ncol, figsize=(WIDTH_IN, 3.2 * rows + 0.8), squeeze=False)
    others = [a for a in configs.axes if a != axis]
    for ax, col in zip(axes.flat, panels):
        series = [(k, cols[col][k]) for k in ks if k in cols.get(col, {})] if col in cols else [(None, col)]
        for gi, g in enumerate(groups):
            for si, (k, key) in enumerate(series):
                x = [pos[str(t.iloc[p][axis])] for p in g]
                y = np.array([t.iloc[p][key] for p in g], dtype=float)
                e = np.nan_to_num(np.array([t.iloc[p][f"{key}_std"] for p in g], dtype=float))
                lab = (fk_label(k, "z") if k else "") + (" | " + ", ".join(f"{axis_label(a)}={format_value(t.iloc[g[0]][a])}"
                                                                     for a in others) if len(groups) > 1 else "")
                ax.errorbar(x, y, yerr=e, marker="o", ms=3, capsize=2, lw=1, color=f"C{si}",
                            ls=("-", "--", ":", "-.")[gi % 4], label=lab.strip(" |") or "mean")
        ax.margins(x=0.12)
        ax.set_xticks([pos[v] for v in values])
        ax.set_xticklabels([format_value(v) for v in values], rotation=0 if len(values) < 6 else 45, fontsize=8)
        ax.set_xlabel(f"{axis_label(axis)} ({axis})")
        ax.set_ylabel(metric_label(col))
        ax.set_title(metric_label(col), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labs = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labs, loc="lower center", ncol=min(6, len(labs)), fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.93, bottom=0.1 + 0.02 * math.ceil(len(labs) / 6) / rows,
                        hspace=0.5, wspace=0.3)
    fig.suptitle(f"Metrics against {axis_label(axis)} (configurations that differ only in {axis})", fontsize=11)
    name = name or f"vs_{axis.replace('.', '_')}"
    return _save(fig, folder, name, f"Every metric against {axis} at f, f² and f³ (mean ± std over seeds), "
                                    "over configurations that differ only in this axis.")


def _axis_pos_key(v: str):
    from .data import value_sort_key
    return value_sort_key(v)


LOSS_PANELS = (("train/rec", "L_rec = D(f(x), x)"), ("train/idem", "L_idem = D(f(f(z)), f(z))"),
               ("train/tight", "L_tight (after clamp, ≤ 0)"))


def fig_training_curves(histories: dict[str, dict[str, tuple[list[int], list[float]]]],
                        run_config: dict[str, tuple], labels: dict[tuple, str], folder: Path,
                        name: str = "training_curves") -> Optional[Figure]:
    """L_rec, L_idem and L_tight against the training step, a line per run coloured by configuration."""
    if not any(h.get(k, ([], []))[0] for h in histories.values() for k, _ in LOSS_PANELS):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(WIDTH_IN, 4.2))
    color = {k: f"C{i % 10}" for i, k in enumerate(labels)}  # labels are in the configurations' order
    seen = set()
    for ax, (key, title) in zip(axes, LOSS_PANELS):
        order = list(labels)
        for run_id in sorted(histories, key=lambda r: (order.index(run_config[r]) if run_config[r] in order
                                                        else len(order), r)):
            steps, vals = histories[run_id].get(key, ([], []))
            if not steps:
                continue
            ck = run_config[run_id]
            lab = labels.get(ck, str(ck)) if (ck, key) not in seen else None
            seen.add((ck, key))
            ax.plot(steps, vals, lw=1, alpha=0.85, color=color.get(ck, "0.5"), label=lab)
        ax.set_xlabel("training step (iterations)")
        ax.set_ylabel(f"{key.split('/')[-1]} (D, mean per sample)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labs = axes[0].get_legend_handles_labels()
    fig.legend(handles, labs, loc="lower center", ncol=min(4, max(1, len(labs))), fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.88, bottom=0.22 + 0.04 * max(0, math.ceil(len(labs) / 4) - 1),
                        wspace=0.3)
    fig.suptitle("Training losses per run (logged every train.log_every steps)", fontsize=11)
    return _save(fig, folder, name, "Training curves of L_rec, L_idem and L_tight, one line per run "
                                    "(colour = configuration).")


# ---------------------------------------------------------------------------------------------
# Figures from a saved model (forward passes only).

@dataclass
class Model:
    """A trained model and what generating from it needs."""
    f: Any
    cfg: Any
    data: Any
    noise: Any
    bn_mode: str
    label: str
    step: Optional[int] = None


def has_bn(f) -> bool:
    from torch import nn
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in f.modules())


def forward_k(model: Model, x, k: int, pad_seed: int = 0) -> list:
    """[f(x), ..., f^k(x)] for a small batch x. With BatchNorm in train mode the outputs depend
    on the batch, so x is generated together with noise up to BN_PAD samples (as evaluation does
    with its batches of 250) and the padding is dropped."""
    import torch
    from harness.evaluate import generate_k
    n = len(x)
    pad = 0
    if model.bn_mode == "train" and has_bn(model.f) and n < BN_PAD:
        g = torch.Generator().manual_seed(10_000 + pad_seed)
        extra = model.noise.sample(BN_PAD - n, generator=g)
        x = torch.cat([x, extra.to(x)])
        pad = BN_PAD - n
    outs = generate_k(model.f, x, k, model.bn_mode)
    return [o[:len(o) - pad] if pad else o for o in outs]


def eval_noise(model: Model, n: int, seed: int):
    import torch
    return model.noise.sample(n, generator=torch.Generator().manual_seed(seed))


def _to_rgb(x) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) floats in [0, 1]."""
    a = ((x.detach().float().clamp(-1, 1) + 1) / 2).cpu().numpy()
    a = np.transpose(a, (0, 2, 3, 1))
    return np.repeat(a, 3, axis=3) if a.shape[3] == 1 else a


def _mosaic(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of equal-sized images (each (n, H, W, 3)) into one white-separated array."""
    h, w = rows[0].shape[1:3]
    ncol = max(len(r) for r in rows)
    out = np.ones((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3))
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = img
    return out


def _image_figure(rows: list, row_labels: list[str], title: str, folder: Path, name: str, caption: str,
                  col_labels: Optional[list[str]] = None) -> Figure:
    arrays = [_to_rgb(r) for r in rows]
    mosaic = _mosaic(arrays)
    h, w = mosaic.shape[:2]
    labelled = any(row_labels)
    ncol = max(len(r) for r in rows)
    # labelled rows: at most 1.6 in per image; unlabelled grids: about 7 in tall
    img_w = min(WIDTH_IN - 1.4, 1.6 * ncol) if labelled else min(WIDTH_IN - 1.4, 7.0 * w / h)
    left = 1.2 if labelled else (WIDTH_IN - img_w) / 2
    fig_h = round(img_w * h / w + 0.9 + (0.3 if col_labels else 0), 1)
    fig = plt.figure(figsize=(WIDTH_IN, fig_h))
    ax = fig.add_axes([left / WIDTH_IN, 0.25 / fig_h, img_w / WIDTH_IN, (img_w * h / w) / fig_h])
    ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    cell_h, cell_w = arrays[0].shape[1] + 2, arrays[0].shape[2] + 2
    ax.set_yticks([2 + cell_h * i + cell_h / 2 - 1 for i in range(len(rows))])
    ax.set_yticklabels(row_labels, fontsize=9)
    if col_labels:
        ax.set_xticks([2 + cell_w * j + cell_w / 2 - 1 for j in range(len(col_labels))])
        ax.set_xticklabels(col_labels, fontsize=8)
        ax.xaxis.tick_top()
    else:
        ax.set_xticks([])
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    fig.suptitle(title, fontsize=11, y=1 - 0.15 / fig_h, va="top")
    return _save(fig, folder, name, caption, palette=False)


def _scatter_panels(model: Model, panels: list[tuple[str, Any]], title: str, folder: Path, name: str,
                    caption: str, paths: Optional[list] = None) -> Figure:
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(WIDTH_IN, WIDTH_IN / n + 0.9), sharex=True, sharey=True, squeeze=False)
    ref = model.data.test[:2000].cpu().numpy()
    for i, (ax, (lab, pts)) in enumerate(zip(axes.flat, panels)):
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.8", label="data (test)", rasterized=True)
        if paths is not None and paths[i] is not None:
            for path in paths[i]:
                ax.plot(path[:, 0], path[:, 1], lw=0.8, color="C0", alpha=0.8)
        p = pts.detach().cpu().numpy()
        ax.scatter(p[:, 0], p[:, 1], s=3, c="C3", label=lab)
        ax.set_title(lab, fontsize=10)
        ax.set_xlabel("x1 (data units)")
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
    axes.flat[0].set_ylabel("x2 (data units)")
    fig.subplots_adjust(left=0.06, right=0.99, top=0.82, bottom=0.14, wspace=0.1)
    fig.suptitle(title, fontsize=11)
    return _save(fig, folder, name, caption)


_SUP = {1: "", 2: "²", 3: "³", 4: "⁴", 5: "⁵", 6: "⁶"}


def fk_label(k: int, arg: str = "z") -> str:
    return f"f{_SUP.get(k, f'^{k}')}({arg})"


def fig_fk_rows(model: Model, folder: Path, k: int = 3, seed: int = 0) -> Figure:
    """Paper Figs. 4, 7, 8: z, f(z), f²(z), f³(z) for the same noise (toy data: scatter panels)."""
    z = eval_noise(model, ROW_COLS if model.data.is_image else 1000, seed)
    outs = forward_k(model, z, k, seed)
    labels = ["z"] + [fk_label(j) for j in range(1, k + 1)]
    cap = (f"Figs. 4/7/8: z, then f applied 1..{k} times to the same noise ({model.label}); "
           "later applications change less as outputs approach the learned manifold.")
    if not model.data.is_image:
        return _scatter_panels(model, list(zip(labels, [z] + outs)), f"f^k(z) for the same noise, {model.label}",
                               folder, "fig4_fk_rows", cap)
    rows = [z.clamp(-1, 1)] + outs
    return _image_figure(rows, labels, f"Same noise, f applied k times ({model.label})", folder, "fig4_fk_rows", cap)


def fig_uncurated(model: Model, folder: Path, k: int = 4, seed: int = 1) -> list[Figure]:
    """Paper Figs. 11-14: uncurated samples f^k(z), k = 1..4, one 8 x 8 grid per k from the same
    64 noise samples (toy data: one figure of scatter panels)."""
    n = GRID_N if model.data.is_image else 2000
    z = eval_noise(model, n, seed)
    outs = forward_k(model, z, k, seed)
    if not model.data.is_image:
        return [_scatter_panels(model, [(fk_label(j), outs[j - 1]) for j in range(1, k + 1)],
                                f"Uncurated samples f^k(z), k = 1..{k} ({n} points), {model.label}",
                                folder, "fig11_14_uncurated", f"Figs. 11-14 for 2-D data: {n} samples "
                                f"f^k(z), k = 1..{k}, over the test data (grey).")]
    figs = []
    side = int(math.sqrt(GRID_N))
    for j in range(1, k + 1):
        y = outs[j - 1]
        rows = [y[i * side:(i + 1) * side] for i in range(side)]
        figs.append(_image_figure(rows, [""] * side, f"Uncurated {fk_label(j)}, {GRID_N} samples ({model.label})",
                                  folder, f"fig{10 + j}_uncurated_k{j}",
                                  f"Fig. {10 + j}: uncurated samples {fk_label(j)} (the same {GRID_N} noise samples "
                                  "in every grid)."))
    return figs


def fig_projection(model: Model, folder: Path, tasks: Sequence[str], k: int = 2, n: int = 8,
                   seed: int = 0) -> Figure:
    """Paper Fig. 5: clean test images x, then per task the degraded inputs y and f(y)..f^k(y).
    Projection runs on BN_PAD degraded test images (BN batch statistics), the first n are shown."""
    import torch
    from harness.data import to_model_range
    from ign.degrade import degrade
    names = {"noise": "x + n", "grayscale": "g(x)", "sketch": "s(x)", "mask": "masked x"}  # short: row labels
    x = to_model_range(model.data.test[:max(n, BN_PAD)])
    rows, labels = [x[:n]], ["x (clean)"]
    for task in tasks:
        y = degrade(task, x, generator=torch.Generator().manual_seed(seed))
        outs = forward_k(model, y, k, seed)
        rows += [y[:n].clamp(-1, 1)] + [o[:n] for o in outs]
        labels += [f"y = {names.get(task, task)}"] + [fk_label(j, "y") for j in range(1, k + 1)]
    return _image_figure(rows, labels, f"Projection of degraded test images ({model.label})", folder,
                         "fig5_projection", f"Fig. 5: degraded held-out images y ({', '.join(tasks)}) projected "
                         f"with f^1..f^{k} (appendix C: n ~ N(0, 0.15²), g = grayscale, s = sketch); first rows: the clean images.")


def fig_interpolation(model: Model, folder: Path, k: int = 3, pairs: int = 2, frames: int = 10,
                      seed: int = 2) -> Figure:
    """Latent interpolation: f^k along straight noise paths (1 - t) z0 + t z1 (paper §4's videos)."""
    import torch
    from ign.sampling import interpolate
    z = eval_noise(model, 2 * pairs, seed)
    paths = torch.cat([interpolate(z[2 * i], z[2 * i + 1], frames) for i in range(pairs)])
    outs = forward_k(model, paths, k, seed)
    cap = (f"Latent interpolation: f^1..f^{k} of {frames} evenly spaced points on straight lines between "
           f"{pairs} pairs of noise samples.")
    if not model.data.is_image:
        panels = [("z path", paths)] + [(fk_label(j, "z path"), outs[j - 1]) for j in range(1, k + 1)]
        lines = [[p[i * frames:(i + 1) * frames].cpu().numpy() for i in range(pairs)] for _, p in panels]
        return _scatter_panels(model, panels, f"Interpolation paths mapped by f^k ({model.label})", folder,
                               "interpolation", cap, paths=lines)
    rows, labels = [], []
    for i in range(pairs):
        for j in range(1, k + 1):
            rows.append(outs[j - 1][i * frames:(i + 1) * frames])
            labels.append(f"pair {i + 1}: {fk_label(j)}")
    cols = [f"t={t:.2f}" for t in np.linspace(0, 1, frames)]
    return _image_figure(rows, labels, f"Latent interpolation ({model.label})", folder, "interpolation", cap, cols)


def fig_arithmetic(model: Model, folder: Path, labels_of: Callable[[Any], Any], attribute: str = "Eyeglasses",
                   pool: int = 256, n: int = 4, seed: int = 3) -> tuple[Optional[Figure], str]:
    """Paper Fig. 6: f(z_pos − z_neg + z). Rule: a pool of noise samples is labelled by the attribute
    of the nearest training face to f(z) (`labels_of(images) -> bool tensor`); z_pos is the pool's
    first positive, z_neg its first negative, and the bases z the first n negatives after it.
    Returns (figure or None, the rule or the reason it was skipped)."""
    import torch
    from ign.sampling import arithmetic
    zp = eval_noise(model, pool, seed)
    fz = forward_k(model, zp, 1, seed)[0]
    lab = labels_of(fz).bool().cpu()
    pos, neg = torch.nonzero(lab).flatten().tolist(), torch.nonzero(~lab).flatten().tolist()
    if not pos or len(neg) < n + 1:
        return None, (f"skipped: {len(pos)} of {pool} noise samples map to faces whose nearest training face "
                      f"has {attribute} (need at least one, and {n + 1} without)")
    z_pos, z_neg = zp[pos[0]], zp[neg[0]]
    bases = zp[neg[1:n + 1]]
    edits = torch.stack([arithmetic(z_pos, z_neg, b) for b in bases])
    out = forward_k(model, torch.cat([edits, z_pos[None], z_neg[None]]), 1, seed)[0]
    f_edit, f_pos, f_neg = out[:n], out[n], out[n + 1]
    f_base = fz[neg[1:n + 1]]
    rows = [torch.stack([f_pos, f_neg, f_base[i], f_edit[i]]) for i in range(n)]
    rule = (f"z_pos / z_neg: the first of {pool} noise samples (seed {seed}) whose f(z)'s nearest training face "
            f"(L2 at 32 × 32) has / lacks {attribute}; bases z: the next {n} samples without it")
    fig = _image_figure(rows, [f"edit {i + 1}" for i in range(n)],
                        f"Latent arithmetic, {attribute} ({model.label})", folder, "fig6_arithmetic",
                        f"Fig. 6: f(z_pos − z_neg + z). {rule}.",
                        col_labels=["f(z_pos)", "f(z_neg)", "f(z)", "f(z_pos − z_neg + z)"])
    return fig, rule
