"""The trial loop: deterministic, resumable, checkpoints that survive corruption, and Theorem 1 on toy data."""
import json

import pytest
import torch

from harness.checkpoint import list_checkpoints, load_latest, save_checkpoint
from harness.config import build_config
from harness.trial import batch_indices, load_trained, run_trial


def toy_cfg(**over):
    base = {"data.dataset": "ring8", "train.steps": 40, "train.batch_size": 128, "train.log_every": 10,
            "train.ckpt_every": 20, "eval.n_samples": 200, "eval.k": 2, "eval.grid": 0,
            "model.hidden": 64, "model.depth": 2}
    return build_config({**base, **over})


def test_batches_are_a_pure_function_of_seed_and_step():
    a = [batch_indices(1000, 64, 3, s) for s in range(40)]
    b = [batch_indices(1000, 64, 3, s) for s in reversed(range(40))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # one epoch visits every example at most once, and the order changes between epochs
    epoch = torch.cat(a[:15])
    assert len(set(epoch.tolist())) == len(epoch)
    assert not torch.equal(a[0], a[15])


def test_same_seed_same_weights_and_resume_is_exact(tmp_path):
    cfg = toy_cfg()
    log_a, log_b = [], []
    run_trial(cfg, tmp_path / "a", report=log_a.append, progress=False)
    # interrupted after 20 steps (a checkpoint at 20), then the same command again
    run_trial(toy_cfg(**{"train.steps": 20}), tmp_path / "b", report=log_b.append, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["ckpt-00000020.pt"]
    run_trial(cfg, tmp_path / "b", report=log_b.append, progress=False)
    fa, _, cka = load_trained(tmp_path / "a")
    fb, _, ckb = load_trained(tmp_path / "b")
    assert cka["step"] == ckb["step"] == 40
    for (k, va), vb in zip(fa.state_dict().items(), fb.state_dict().values()):
        assert torch.equal(va, vb), k
    loss_a = [m["train/loss"] for m in log_a if "train/loss" in m]
    loss_b = [m["train/loss"] for m in log_b if "train/loss" in m and m["step"] > 20]
    assert loss_a[-2:] == loss_b[-2:]


def test_a_different_config_in_the_same_folder_is_refused(tmp_path):
    run_trial(toy_cfg(**{"train.steps": 20}), tmp_path, progress=False)
    with pytest.raises(ValueError, match="different config"):
        run_trial(toy_cfg(**{"train.steps": 20, "seed": 5}), tmp_path, progress=False)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    d = tmp_path / "ck"
    save_checkpoint(d, 10, {"model": {"w": torch.ones(2)}, "config": {}})
    p = save_checkpoint(d, 20, {"model": {"w": torch.zeros(2)}, "config": {}})
    p.write_bytes(p.read_bytes()[:100])  # truncated
    ck = load_latest(d)
    assert ck["step"] == 10 and torch.equal(ck["model"]["w"], torch.ones(2))
    assert "unreadable" in caplog.text
    # only the newest two are kept, and no temp files are left behind
    save_checkpoint(d, 30, {"model": {}, "config": {}})
    save_checkpoint(d, 40, {"model": {}, "config": {}})
    assert sorted(q.name for q in d.iterdir()) == ["ckpt-00000030.pt", "ckpt-00000040.pt"]


def test_trial_writes_config_checkpoint_samples_and_reports(tmp_path):
    cfg = toy_cfg(**{"eval.grid": 256, "eval.every": 20})
    log = []
    final = run_trial(cfg, tmp_path, report=log.append, progress=False)
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.model_dump(mode="json")
    ck = load_latest(tmp_path / "checkpoints")
    assert ck["config"] == cfg.model_dump(mode="json") and ck["step"] == 40
    assert (tmp_path / "samples" / "samples_k.png").stat().st_size > 1000
    evals = [m for m in log if "swd_k1" in m]
    assert [m["step"] for m in evals] == [20, 40]
    assert [m["step"] for m in log if "train/loss" in m] == [10, 20, 30, 40]
    for k in (1, 2):
        assert final[f"swd_k{k}"] > 0 and f"idem_k{k}" in final


@pytest.mark.slow
def test_theorem1_on_the_ring(tmp_path):
    """The toy preset, as `ign-bench train --dataset ring8` runs it, in at most 60 s of CPU: the
    energy distance of f(z) to fresh data falls at least 5x from its value at initialisation, and
    at least 7 of the 8 modes are covered."""
    import time
    from ign import apply_k, energy_distance, mode_coverage, toy_sample
    from harness.trial import build_trial
    cfg = build_config({"data.dataset": "ring8", "eval.grid": 0, "eval.k": 1})
    ref, _ = toy_sample("ring8", 2000, torch.Generator().manual_seed(99))  # fresh data, never trained on
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(98))
    _, f0, _, _ = build_trial(cfg)
    before = energy_distance(apply_k(f0, z, 1)[0], ref)
    t = time.process_time()
    final = run_trial(cfg, tmp_path, progress=False)
    cpu_s = time.process_time() - t
    f, _, _ = load_trained(tmp_path, device="cpu")
    y = apply_k(f, z, 1)[0]
    after = energy_distance(y, ref)
    modes = mode_coverage(y, "ring8")["modes"]
    print(f"energy {before:.3f} -> {after:.3f} ({before / after:.1f}x), modes {modes:.0f}/8, "
          f"train {final['train_time_s']:.1f} s wall, {cpu_s:.1f} s CPU")
    assert before / after >= 5
    assert modes >= 7
    assert final["modes_k1"] >= 7  # the harness's own evaluation agrees
    assert final["train_time_s"] <= 60 or cpu_s <= 60


def test_projection_measures_are_reported_when_enabled(tmp_path):
    cfg = build_config({"data.dataset": "mnist", "data.limit": 512, "train.steps": 3, "train.batch_size": 16,
                        "eval.extractors": [], "eval.n_samples": 32, "eval.grid": 0, "eval.k": 2,
                        "eval.project": ["noise", "mask"], "eval.project_n": 16})
    log = []
    final = run_trial(cfg, tmp_path, report=log.append, progress=False)
    for task in ("noise", "mask"):
        for k in (1, 2):
            assert 0 < final[f"proj_{task}_psnr_k{k}"] < 100
        assert f"proj_{task}_psnr_base" in final and f"proj_{task}_acc_k1" in final
    assert "proj_noise_psnr_k1" in log[-1]  # reported, so a sweep logs it to MLflow
