"""Our training step against the paper's Source Code 1 as the bench runs it, and the bench's output.

The speed targets are measured by `ign-bench bench`, not asserted here: only the maths (same losses,
same gradients, same BN statistics, same weights after several steps) and the table's format.
"""
import copy
import json
import os
import time

import pytest
import torch

from harness.bench import LOSSES, paper_train_step, render, split_sweep_time
from ign import LossConfig, build_model, train_step

CONFIGS = {
    "listing": LossConfig(**LOSSES["listing"]),                          # Source Code 1: L2, no clamp
    "clamp-rec": LossConfig(),                                           # Table 1: L1, clamp on batch rec
    "clamp-drift": LossConfig(distance="l2", clamp_reference="drift", clamp_ratio=1.0),
    "warmup": LossConfig(tight_warmup=10),                               # λt at step 3 = 0.3 λt
    "clamp-l2": LossConfig(distance="l2", clamp_ratio=1.0),              # eq. 14 with L2 (multi-step)
}


def setup(name, batch, seed=0, width=None):
    torch.manual_seed(seed)
    f = build_model(name, **({"width": width, "latent": 4 * width} if width else {}))
    c, h, w = f.shape
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch, c, h, w, generator=g) * 2 - 1
    z = torch.randn(batch, c, h, w, generator=g)
    return f, x, z


@pytest.mark.parametrize("name,batch,cfg_name", [
    ("dcgan28", 16, "listing"), ("dcgan28", 16, "clamp-rec"), ("dcgan28", 16, "clamp-drift"),
    ("dcgan28", 16, "warmup"), ("dcgan64", 4, "listing"), ("dcgan64", 4, "clamp-rec")])
def test_one_step_same_losses_gradients_and_bn_statistics(name, batch, cfg_name):
    """One step from the same weights on the same batch: our train_step (one shared outer pass)
    against the paper's loop (f_copy refreshed by load_state_dict, four forward passes)."""
    cfg = CONFIGS[cfg_name]
    f, x, z = setup(name, batch)
    ours, paper, paper_copy = copy.deepcopy(f), copy.deepcopy(f), copy.deepcopy(f)
    # lr = 0: the optimizers leave the weights alone, so .grad is the step's gradient to compare.
    out = train_step(ours, torch.optim.SGD(ours.parameters(), lr=0.0), x, z, cfg, step=3)
    exp = paper_train_step(paper, paper_copy, torch.optim.SGD(paper.parameters(), lr=0.0), x, z, cfg, step=3)

    for k in ("loss", "rec", "idem", "tight", "tight_raw"):
        assert out[k] == pytest.approx(exp[k], rel=1e-5, abs=1e-7), k
    if cfg.clamp_ratio is not None:
        assert out["tight"] != out["tight_raw"]  # the clamp did something
    for (n, p), q in zip(ours.named_parameters(), paper.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=n)
        # in fact they differ only by the order of float32 sums: ~1e-7 of the largest entry
        assert (p.grad - q.grad).abs().max() <= 1e-6 * q.grad.abs().max() + 1e-9, n
    # BN running statistics: f(x), f(z), f(f(z)) in that order on both sides; f_copy's are its own.
    for (n, a), b in zip(ours.named_buffers(), paper.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    assert all(int(b) == 3 for n, b in ours.named_buffers() if n.endswith("num_batches_tracked"))


@pytest.mark.parametrize("name,width,batch,cfg_name", [("dcgan28", 16, 16, "listing"), ("dcgan28", 16, 16, "clamp-l2"),
                                                       ("dcgan64", 8, 4, "clamp-l2")])
def test_several_steps_same_weights(name, width, batch, cfg_name):
    """Four SGD steps on changing batches end at the same weights and BN statistics.

    SGD, not Adam: conv biases in front of BN get a gradient that is rounding noise, which Adam
    would normalise into full-size steps and so compare noise with noise. L2, not L1: L1's sign(·)
    turns a last-bit difference of a residual near zero into a gradient change of order 1/N, which
    later steps amplify (one step of L1 is checked to 1e-5 above). Narrow models: after the first
    step the two runs' weights differ in the last bits, and in a 64-wide model some of its ~10^5
    LeakyReLU inputs near zero then take the other slope, a real (if tiny) change of the gradient
    that is not a difference of the two methods."""
    cfg = CONFIGS[cfg_name]
    f, x, z = setup(name, batch, seed=7, width=width)
    ours, paper, paper_copy = copy.deepcopy(f), copy.deepcopy(f), copy.deepcopy(f)
    opt = torch.optim.SGD(ours.parameters(), lr=0.002)
    ref_opt = torch.optim.SGD(paper.parameters(), lr=0.002)
    for step in range(4):
        xs, zs = (x + 0.05 * step).clamp(-1, 1), z.roll(step, 0)
        out = train_step(ours, opt, xs, zs, cfg, step)
        exp = paper_train_step(paper, paper_copy, ref_opt, xs, zs, cfg, step)
        assert out["loss"] == pytest.approx(exp["loss"], rel=1e-5, abs=1e-7)
    for (n, a), b in zip(ours.state_dict().items(), paper.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert not torch.equal(next(ours.parameters()), next(f.parameters()))  # it did train


def test_shared_and_four_pass_paths_of_train_step_agree():
    """train_step(shared=False) is ign_losses' four-pass path; both give the same update."""
    f, x, z = setup("dcgan28", 8, seed=11, width=16)
    a, b = copy.deepcopy(f), copy.deepcopy(f)
    oa = train_step(a, torch.optim.SGD(a.parameters(), lr=0.01), x, z, CONFIGS["clamp-rec"], 0)
    ob = train_step(b, torch.optim.SGD(b.parameters(), lr=0.01), x, z, CONFIGS["clamp-rec"], 0, shared=False)
    assert oa == pytest.approx(ob, rel=1e-6)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)


def test_zero_weights_skip_their_vector_jacobian_products():
    """λt = 0 (start of the warm-up) and λi = 0 skip a backward pass; the gradient is unchanged."""
    for cfg in (LossConfig(tight_warmup=5), LossConfig(lambda_idem=0.0)):
        f, x, z = setup("dcgan28", 8, seed=2, width=16)
        a, b, bc = copy.deepcopy(f), copy.deepcopy(f), copy.deepcopy(f)
        train_step(a, torch.optim.SGD(a.parameters(), lr=0.0), x, z, cfg, 0)
        paper_train_step(b, bc, torch.optim.SGD(b.parameters(), lr=0.0), x, z, cfg, 0)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_path_runs_on_cpu():
    """The --bf16 code path (autocast around train_step) on CPU, where bfloat16 autocast exists."""
    from harness.bench import BF16_LOSS_RTOL, bf16_loss_check
    f, x, z = setup("dcgan28", 4, width=16)
    r = bf16_loss_check("dcgan28", x, z, "listing", torch.device("cpu"))
    assert set(r["per_term"]) == {"rec", "idem", "tight"} and r["tol"] == BF16_LOSS_RTOL
    assert r["max_rel"] <= BF16_LOSS_RTOL
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = train_step(f, torch.optim.SGD(f.parameters(), lr=0.01), x, z, CONFIGS["listing"], 0)
    assert all(isinstance(v, float) for v in out.values())


# ---------------------------------------------------------------- the bench's output
def test_sweep_split_from_trial_files(tmp_path):
    """Slot-second accounting of the smoke sweep from final.json / config.json / summary.json."""
    t0 = time.time() - 100.0
    sweep = tmp_path / "smoke"
    for i, (start, end, tr, ev) in enumerate([(10, 50, 30, 5), (12, 60, 35, 6)]):
        d = sweep / "trials" / f"t{i}"
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "final.json").write_text(json.dumps({"train_time_s": tr, "eval_time_s": ev}))
        os.utime(d / "config.json", (t0 + start, t0 + start))
        os.utime(d / "final.json", (t0 + end, t0 + end))
    (sweep / "summary.json").write_text(json.dumps({"wall_time_s": 65.0}))
    s = split_sweep_time(sweep, slots=2, t0=t0, t1=t0 + 70.0)
    assert s["wall_s"] == pytest.approx(70.0)
    assert s["train_s"] == 65 and s["eval_s"] == 11 and s["trials"] == 2
    assert s["other_s"] == pytest.approx(140 - 76)
    assert s["train_share"] + s["eval_share"] + s["other_share"] == pytest.approx(1.0)
    b = s["breakdown"]
    assert b["before_first_trial_s"] == pytest.approx(10, abs=1e-3)
    assert b["after_last_trial_s"] == pytest.approx(10, abs=1e-3)
    assert b["inside_trials_s"] == pytest.approx((40 - 35) + (48 - 41), abs=1e-3)
    assert b["cli_before_run_sweep_s"] == pytest.approx(5.0)


def test_render_has_every_section():
    timing = {"images_per_s": 30.0, "median_s": 1.0, "times_s": [1.0, 1.0], "first_s": 2.0}
    res = {"quick": False, "device": "cpu", "torch": "2", "threads": 2, "cores": 2, "load_start": (1.0, 1, 1),
           "load_end": (2.0, 1, 1), "started": "now", "malloc_env_in_process": True,
           "train": [{"model": "dcgan28", "batch": 256, "loss": "listing", "data": "mnist-train", "ratio": 1.5,
                      "timing": {"ours": timing, "paper": {**timing, "images_per_s": 20.0}},
                      "memory": {"ours": {"peak_bytes": 2**30}, "paper": {"peak_bytes": 2**31}}}],
           "eval": {"extract": {"inception": {"images_per_s": 20.0, "n": 192}},
                    "evaluate": {"n": 250, "k": 3, "extractors": ["mnist"], "identical_metrics": True,
                                 "cold": {"seconds": 10.0, "reference_images": 250, "f_passes": 6},
                                 "warm": {"seconds": 8.0, "reference_images": 0, "f_passes": 6}}},
           "sweep": {"wall_s": 100.0, "trials": 4, "slots": 2, "train_s": 100.0, "eval_s": 20.0, "other_s": 80.0,
                     "train_share": 0.5, "eval_share": 0.1, "other_share": 0.4,
                     "breakdown": {"before_first_trial_s": 20.0, "cli_before_run_sweep_s": 3.0,
                                   "inside_trials_s": 10.0, "after_last_trial_s": 5.0, "trial_span_s": 70.0}}}
    table = render(res)
    assert "| train dcgan28 batch 256 | images/s, median of 2 steps" in table
    assert "| 30.0 | 20.0 | 1.50× | ≥ 1.2×: met |" in table
    assert "| 1024 MiB | 2048 MiB | 0.50× |" in table
    assert "| evaluation | inception features, images/s" in table and "≥ 25: MISSED" in table
    assert "reference pass skipped, same metrics: met" in table
    assert "| sweep smoke | everything else" in table and "| 40% | ≤ 10%: MISSED |" in table


def test_bench_quick_smoke(cli, tmp_path):
    """`ign-bench bench --quick --skip-sweep` end to end: one table on stdout, the same in --out."""
    out, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    proc = cli("bench", "--quick", "--skip-sweep", "--device", "cpu", "--out", out, "--json", raw, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = out.read_text()
    assert table in proc.stdout
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == "| section | measurement | ours | paper's loop | ratio or share | target |"
    assert all(len(line.strip().strip("|").split("|")) == 6 for line in rows), rows  # six columns in every row
    for model in ("dcgan28 batch 16", "dcgan64 batch 4"):
        assert any(line.startswith(f"| train {model} | images/s") for line in rows)
        assert any(line.startswith(f"| train {model} | peak memory") for line in rows)
    assert any("mnist features, images/s" in line for line in rows)
    assert any("inception features, images/s" in line for line in rows)
    assert any("cold reference cache" in line for line in rows)
    assert "reference pass skipped, same metrics: met" in table
    assert "sweep smoke" not in table
    res = json.loads(raw.read_text())
    ev = res["eval"]["evaluate"]
    assert ev["cold"]["reference_images"] == 32 and ev["warm"]["reference_images"] == 0
    # f^1..f^4 incrementally (K+1 passes per batch: the extra one is idem at f^3), plus drift_real
    assert ev["warm"]["f_passes"] == 5
    for row in res["train"]:
        assert row["ratio"] > 0 and all(m["peak_bytes"] > 0 for m in row["memory"].values())
