"""`ign-bench evaluate CHECKPOINT`: every metric at f^1..f^K for a trained model (EDM2's
calculate_metrics as its own command; the library is harness.evaluate)."""
from __future__ import annotations

import json
import re
from pathlib import Path


def metrics_table(result: dict) -> str:
    """Rows: metric[_extractor], columns: k = 1..K (plain text, aligned)."""
    rows: dict[str, dict[int, float]] = {}
    for key, v in result.items():
        m = re.match(r"^(.*)_k(\d+)(_bneval)?$", key)
        if m and isinstance(v, (int, float)):
            rows.setdefault(m.group(1) + (m.group(3) or ""), {})[int(m.group(2))] = float(v)
    ks = sorted({k for r in rows.values() for k in r})
    head = ["metric"] + [f"k={k}" for k in ks]
    body = [[name] + [f"{r[k]:.5g}" if k in r else "—" for k in ks] for name, r in sorted(rows.items())]
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [head] + body]
    extra = [f"{k} = {v}" for k, v in sorted(result.items()) if not re.match(r"^.*_k\d+(_bneval)?$", k)]
    return "\n".join(lines + [""] + extra)


def cmd_evaluate(args) -> int:
    from .config import resolve_device
    from .data import load_dataset
    from .evaluate import evaluate
    from .trial import load_trained
    if args.k < 1:
        raise ValueError(f"--k: must be >= 1, got {args.k}")
    device = resolve_device(args.device)
    f, cfg, ck = load_trained(args.checkpoint, device=device)
    ev = {"k": args.k, "bn_mode": args.bn_mode}
    if args.n is not None:
        ev["n_samples"] = args.n
    if args.extractor:
        ev["extractors"] = [e for e in args.extractor.split(",") if e]
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update=ev)})
    type(cfg).model_validate(cfg.model_dump())  # re-validate the overrides (bad extractor -> one line)
    data = load_dataset(cfg.data.dataset, cfg.data.root, cfg.data.download, cfg.data.image_size, cfg.seed)
    if tuple(ck.get("shape") or data.shape) != data.shape:
        raise ValueError(f"checkpoint: trained on {tuple(ck['shape'])} but {cfg.data.dataset} is {data.shape}")
    result = evaluate(f, data, cfg, device=device, log=print)
    result = {"checkpoint": str(ck.get("path", args.checkpoint)), "step": ck["step"], **result}
    print(metrics_table(result))
    out = Path(args.out) if args.out else Path(args.checkpoint) / f"eval-step{ck['step']}.json" \
        if Path(args.checkpoint).is_dir() else Path(args.checkpoint).with_suffix(".eval.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {out}")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("evaluate", help="every metric at f^1..f^K for a checkpoint (table + JSON)",
                       description="Evaluate a trained model: FID/KID/precision/recall/IS/modes per "
                                   "extractor at each k, idempotence and held-out drift.")
    p.add_argument("checkpoint", help="a checkpoint file or a run folder (its newest checkpoint)")
    p.add_argument("--k", type=int, default=3, help="evaluate f^1..f^k [default: 3]")
    p.add_argument("--n", type=int, help="generated samples per k [default: the run's eval.n_samples; "
                                         "None = 10000 on GPU, 1000 on CPU]")
    p.add_argument("--extractor", help="comma list of inception, mnist [default: the run's]")
    p.add_argument("--bn-mode", default="train", choices=["train", "eval", "both"],
                   help="BatchNorm at evaluation: batch statistics, running statistics, or both")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda [default: auto]")
    p.add_argument("--out", help="JSON output [default: beside the checkpoint]")
    p.set_defaults(func=cmd_evaluate)
