"""`ign-bench`: the command line. Every config flag is derived from TrialConfig (no hand copies).

Bad input (unknown key, out-of-range value, missing data) prints one line and exits with code 2,
before anything is written.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import PRESETS, ConfigError, TrialConfig, build_config, leaf_keys, parse_value
from .paths import PROJECT_ROOT

# Short spellings for the flags people type most; every other key is `--section.key`.
ALIASES = {"dataset": "data.dataset", "data-root": "data.root", "steps": "train.steps",
           "batch-size": "train.batch_size", "lr": "optim.lr", "model": "model.name",
           "noise": "noise.name", "distance": "loss.distance", "k": "eval.k"}


class UsageError(ValueError):
    """Bad command-line input: reported in one line with exit code 2."""


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config leaf (`--loss.lambda_tight 0.5`), plus ALIASES, plus --preset/--set."""
    p.add_argument("--preset", default="auto",
                   help=f"start from a preset: {', '.join(PRESETS)}; auto = by data set; none = bare defaults")
    g = p.add_argument_group("config keys (defaults shown are before the preset is applied)")
    alias_of = {v: k for k, v in ALIASES.items()}
    fields = _field_docs()
    for key, default in leaf_keys().items():
        if key == "preset":  # --preset above
            continue
        names = [f"--{key}"] + ([f"--{alias_of[key]}"] if key in alias_of else [])
        g.add_argument(*names, dest=f"cfg:{key}", default=argparse.SUPPRESS, metavar="V",
                       help=f"{fields.get(key, '')} [default: {default}]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V",
                   help="any config key, e.g. --set loss.clamp_ratio=null (repeatable)")


def _field_docs() -> dict[str, str]:
    """Help text for each key: the field's inline comment in config.py / ign/losses.py."""
    import inspect
    import re
    from ign import config as losses
    from . import config
    docs: dict[str, str] = {}
    section_of = {"ModelConfig": "model", "DataConfig": "data", "NoiseConfig": "noise", "OptimConfig": "optim",
                  "TrainConfig": "train", "EvalConfig": "eval", "LossConfig": "loss", "TrialConfig": ""}
    for mod in (config, losses):
        cls = None
        for line in inspect.getsource(mod).splitlines():
            m = re.match(r"class (\w+)\(", line)
            if m:
                cls = m.group(1)
                continue
            m = re.match(r"\s+(\w+): [^=]+=.*#\s*(.+)$", line)
            if m and cls in section_of:
                sec = section_of[cls]
                docs[f"{sec}.{m.group(1)}" if sec else m.group(1)] = m.group(2).replace("%", "%%")
    return docs


def config_from_args(args: argparse.Namespace) -> TrialConfig:
    overrides: dict[str, Any] = {}
    for name, value in vars(args).items():
        if name.startswith("cfg:"):
            overrides[name[4:]] = parse_value(value)
    for item in args.set:
        if "=" not in item:
            raise UsageError(f"--set: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[ALIASES.get(k, k)] = parse_value(v)
    preset = None if args.preset in ("none", "None") else args.preset
    return build_config(overrides, preset=preset)


def default_out(cfg: TrialConfig) -> Path:
    return PROJECT_ROOT / "runs" / "train" / f"{cfg.data.dataset}-{cfg.run_key()}"


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    device = cfg.resolved_device()  # a bad device fails here, before anything is written
    _check_data(cfg)
    out = Path(args.out).resolve() if args.out else default_out(cfg)
    if args.dry_run:
        print(json.dumps({"out": str(out), "device": str(device), **cfg.flat()}, indent=2))
        return 0
    from .trial import run_trial
    history = out / "metrics.jsonl"

    def report(m: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        with open(history, "a") as fh:
            fh.write(json.dumps(m) + "\n")

    print(f"run folder: {out}\ndevice: {device}", file=sys.stderr)
    final = run_trial(cfg, out, report=report, progress=not args.quiet)
    print(json.dumps(_rounded(final), indent=2))
    print(f"checkpoint and samples: {out}", file=sys.stderr)
    return 0


def _check_data(cfg: TrialConfig) -> None:
    """Fail fast (before any output) when the data are not where the config says."""
    from .data import DEFAULT_DATA_ROOT
    from ign.toy import TOYS
    if cfg.data.dataset in TOYS:
        return
    root = Path(cfg.data.root).expanduser() if cfg.data.root else DEFAULT_DATA_ROOT
    if not root.exists():
        raise UsageError(f"data.root: {root} does not exist")
    if cfg.data.dataset == "mnist" and not cfg.data.download and not (root / "MNIST" / "raw").is_dir():
        raise UsageError(f"data.root: no MNIST/raw under {root}; allowed: a torchvision MNIST root, or data.download=true")


def _rounded(d: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ign-bench", description="Idempotent Generative Networks: train, evaluate, sweep, report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  ign-bench train --dataset mnist --steps 1500\n"
               "  ign-bench train --dataset ring8 --steps 2000 --loss.lambda_tight 0.1\n"
               "  ign-bench fid mnist-test mnist-train --extractor mnist --n 2000\n"
               "  ign-bench sweep smoke")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train one IGN model (resumes if its run folder has a checkpoint)",
                       description="Train one IGN model. Re-running the same command resumes it; a larger "
                                   "--steps continues training. Writes checkpoints/, samples/*.png, metrics.jsonl.")
    t.add_argument("--out", help="run folder (default: runs/train/<dataset>-<config hash>)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    for mod in _plugin_modules(command):
        mod.add_cli(sub)
    return p


# Subcommands that live with their code; each module has add_cli(subparsers). Only the module of
# the command being run is imported, so `ign-bench sweep bad.yaml` fails in well under a second
# instead of first importing torch-fidelity, MLflow and Ray.
PLUGINS = {"fid": "harness.fidelity", "evaluate": "harness.evaluate_cli", "sweep": "harness.sweep",
           "ui": "harness.tracking", "project": "harness.project", "report": "reports.build",
           "paper": "reports.build", "bench": "harness.bench"}


def _plugin_modules(command: Optional[str] = None):
    import importlib
    if command == "train":
        return []
    names = [PLUGINS[command]] if command in PLUGINS else list(dict.fromkeys(PLUGINS.values()))
    mods = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # not written yet
                continue
            raise
        if hasattr(mod, "add_cli"):
            mods.append(mod)
    return mods


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in PLUGINS or command == "train" else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UsageError, ValueError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"ign-bench {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ign-bench {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
