"""harness.project: zero-shot projection and latent operations, on a small MNIST model trained here."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from harness.cli import main
from harness.config import build_config
from harness.data import Data, load_dataset, to_model_range, to_uint8
from harness.project import (BASELINES, MEASURES, TASKS, celeba_attribute, format_table, interpolation_smoothness,
                             latent_arithmetic, nearest_labels, project, projection_metrics, projection_table,
                             projections, psnr, ssim)

K = 2




@pytest.fixture(scope="module")
def trained(mnist, tmp_path_factory):
    """A small dcgan28 trained for 40 steps by the real trial runner; (f, cfg, run folder)."""
    from harness.trial import load_trained, run_trial
    torch.set_num_threads(1)
    cfg = build_config({"data.dataset": "mnist", "train.steps": 40, "train.batch_size": 32, "model.width": 8,
                        "model.latent": 16, "eval.extractors": [], "eval.n_samples": 64, "eval.batch_size": 64,
                        "eval.grid": 0, "train.ckpt_every": 1000, "device": "cpu"})
    out = tmp_path_factory.mktemp("run")
    run_trial(cfg, out, progress=False, data=mnist)
    f, cfg, _ = load_trained(out, "cpu")
    return f, cfg, out


def _state(f):
    return {k: v.clone() for k, v in f.state_dict().items()}, [m.training for m in f.modules()]


def test_every_task_gives_every_measure_at_every_k(trained, mnist):
    f, cfg, _ = trained
    before, flags = _state(f)
    r = project(f, mnist, cfg, k=K, n=48)
    methods = ["k0"] + [f"k{k}" for k in range(1, K + 1)] + ["base"]
    for task in TASKS:
        for measure in MEASURES:
            for method in methods:
                v = r[f"proj_{task}_{measure}_{method}"]
                assert isinstance(v, float) and math.isfinite(v), (task, measure, method, v)
    for measure in ("drift", "fid", "kid", "acc"):
        assert math.isfinite(r[f"proj_clean_{measure}_real"])
    metrics = projection_metrics(r)  # what a trial logs: every measure, numbers only
    assert len(metrics) == len(TASKS) * len(MEASURES) * (K + 2) + 4
    rows = projection_table(r)
    assert len(rows) == 1 + len(TASKS) * (K + 2)
    assert [r_["method"] for r_ in rows if r_["task"] == "mask"] == ["identity", "ign", "ign", BASELINES["mask"][0]]
    assert all(r_[m] is not None for r_ in rows if r_["task"] != "clean" for m in MEASURES)
    # 1-channel grayscale is the identity on its input: reported, and flagged.
    assert r["proj_grayscale_psnr_k0"] == 100.0 and "grayscale" in r["proj_flags"]
    assert "note: grayscale" in format_table(rows)
    after, flags_after = _state(f)  # f is untouched: parameters, BN statistics, train/eval flags
    assert flags == flags_after and all(torch.equal(before[k], after[k]) for k in before)


def _psnr_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of 10 log10(1 / MSE), images [-1, 1] clipped then mapped to [0, 1]."""
    vals = []
    for u, v in zip(a, b):
        u = (np.clip(u, -1, 1) + 1) / 2
        v = (np.clip(v, -1, 1) + 1) / 2
        vals.append(10 * math.log10(1.0 / np.mean((u - v) ** 2)))
    return float(np.mean(vals))


@pytest.mark.parametrize("task", ["noise", "mask"])
def test_psnr_and_accuracy_against_an_independent_computation(trained, mnist, task):
    from harness.classifier import load_classifier
    f, cfg, _ = trained
    n = 6
    r = project(f, mnist, cfg, tasks=task, k=K, n=n, fid=False)
    p = projections(f, mnist, task, K, n, "cpu", cfg.eval.bn_mode, batch_size=cfg.eval.batch_size)
    shown = {"k0": p["degraded"], "base": p["base"], **{f"k{k}": p["outs"][k - 1] for k in range(1, K + 1)}}
    net, _ = load_classifier("cpu")
    labels = mnist.test_labels[:n].tolist()
    for method, img in shown.items():
        assert r[f"proj_{task}_psnr_{method}"] == pytest.approx(
            _psnr_numpy(img.numpy(), p["clean"].numpy()), abs=1e-6), method
        correct = 0
        for i in range(n):  # one digit at a time, as a saved 8-bit image
            with torch.no_grad():
                logits = net(to_model_range(to_uint8(img[i:i + 1])))
            correct += int(logits.argmax(1).item() == labels[i])
        assert r[f"proj_{task}_acc_{method}"] == pytest.approx(correct / n), method


def test_psnr_of_a_known_offset():
    x = torch.zeros(2, 1, 16, 16)
    assert psnr(x + 0.2, x).tolist() == pytest.approx([20.0, 20.0])  # 0.1 in [0, 1]: MSE 1e-2


def test_ssim_matches_a_scipy_implementation():
    from scipy.ndimage import gaussian_filter
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)

    def ssim_np(u, v):  # Wang et al. 2004: 11-tap Gaussian (σ 1.5, truncate 3.5 -> radius 5), valid region
        u, v = (u.astype(np.float64) + 1) / 2, (v.astype(np.float64) + 1) / 2
        maps = []
        for c in range(u.shape[0]):
            filt = lambda t: gaussian_filter(t, 1.5, truncate=3.5)[5:-5, 5:-5]  # noqa: E731
            mu, mv = filt(u[c]), filt(v[c])
            suu, svv, suv = filt(u[c] ** 2) - mu ** 2, filt(v[c] ** 2) - mv ** 2, filt(u[c] * v[c]) - mu * mv
            c1, c2 = 0.01 ** 2, 0.03 ** 2
            maps.append(((2 * mu * mv + c1) * (2 * suv + c2)) / ((mu ** 2 + mv ** 2 + c1) * (suu + svv + c2)))
        return float(np.mean(maps))

    ours = ssim(a, b)
    assert ours.tolist() == pytest.approx([ssim_np(a[i].numpy(), b[i].numpy()) for i in range(2)], abs=1e-8)
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0])


def test_harmonic_fill_touches_only_the_box_and_stays_within_its_border():
    fill = BASELINES["mask"][1]
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 1, 20, 20, generator=g) * 2 - 1
    boxes = [(3, 4, 8, 8), (10, 10, 6, 5)]
    out = fill(y, {"boxes": boxes})
    for i, (t, l, h, w) in enumerate(boxes):
        inside = torch.zeros(20, 20, dtype=torch.bool)
        inside[t:t + h, l:l + w] = True
        assert torch.equal(out[i, 0][~inside], y[i, 0][~inside])
        ring = y[i, 0, t - 1:t + h + 1, l - 1:l + w + 1][~inside[t - 1:t + h + 1, l - 1:l + w + 1]]
        assert ring.min() - 1e-6 <= out[i, 0][inside].min() and out[i, 0][inside].max() <= ring.max() + 1e-6


def test_interpolation_smoothness(trained, mnist):
    f, cfg, _ = trained
    for space in ("features", "pixels"):
        r = interpolation_smoothness(f, mnist, cfg, k=K, paths=3, frames=5, space=space)
        for k in range(1, K + 1):
            # Path length over chord is >= 1 (triangle inequality); the largest jump >= the mean one.
            assert r[f"interp_mean_k{k}"] >= 1 - 1e-9
            assert r[f"interp_max_k{k}"] >= r[f"interp_mean_k{k}"] - 1e-9


def test_nearest_labels_and_arithmetic_with_a_stand_in_judge(trained, mnist):
    """The arithmetic bookkeeping on digits: attribute = "is a 1", judge = "bright image"."""
    f, cfg, _ = trained
    small = Data("mnist", mnist.train[:1500], mnist.test[:100], mnist.train_labels[:1500], mnist.test_labels[:100])
    attr = small.train_labels == 1
    assert torch.equal(nearest_labels(small.train[:20], small.train, attr), attr[:20])
    judge = lambda u: u.mean((1, 2, 3)) > -0.75  # noqa: E731
    r = latent_arithmetic(f, small, cfg, k=K, n=40, pool=64, judge=judge, train_labels=attr)
    assert r["arith_n"] == 40 and r["arith_pool"] == 64
    if 0 < r["arith_pool_pos"] < 64:
        for k in range(1, K + 1):
            assert 0 <= r[f"arith_success_k{k}"] <= 1 and 0 <= r[f"arith_base_k{k}"] <= 1
    else:
        assert math.isnan(r["arith_success_k1"])


def test_celeba_eyeglasses_labels_line_up_with_the_split():
    from harness.data import CELEBA_SPLITS, DEFAULT_DATA_ROOT, list_images
    tr, te = celeba_attribute("Eyeglasses")
    files = list_images(DEFAULT_DATA_ROOT / "celeba64" / "images")
    n_train = sum(int(p.stem) <= CELEBA_SPLITS["train"][1] for p in files)
    assert (len(tr), len(te)) == (n_train, len(files) - n_train)
    assert 0.04 < float(torch.cat([tr, te]).double().mean()) < 0.08  # README: 6.0 %
    with pytest.raises(ValueError, match="attribute"):
        celeba_attribute("Monocle")


def _one_line_error(capsys, argv, *words):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def _fake_celeba_checkpoint(folder):
    from harness.checkpoint import save_checkpoint
    from ign import build_model
    cfg = build_config({"data.dataset": "celeba64", "model.width": 4, "model.latent": 8})
    f = build_model("dcgan64", channels=3, width=4, latent=8)
    return save_checkpoint(folder, 1, {"model": f.state_dict(), "config": cfg.model_dump(mode="json"),
                                       "shape": [3, 64, 64], "dataset": "celeba64"}), f, cfg


def test_bad_input_is_one_line(trained, mnist, tmp_path, capsys):
    f, cfg, run = trained
    with pytest.raises(ValueError, match="^task: unknown value 'blur'") as e:
        project(f, mnist, cfg, tasks="noise,blur")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="^k: must be >= 1"):
        project(f, mnist, cfg, k=0)
    ck, f64, cfg64 = _fake_celeba_checkpoint(tmp_path / "celeba")
    with pytest.raises(ValueError, match="^checkpoint: the model maps 3x64x64 but mnist images are 1x28x28"):
        project(f64, mnist, cfg64)

    _one_line_error(capsys, ["project", str(run), "--task", "blur"], "task", "blur", "noise, grayscale")
    _one_line_error(capsys, ["project", str(run), "--k", "0"], "k: must be >= 1")
    _one_line_error(capsys, ["project", str(ck), "--dataset", "mnist"], "checkpoint", "3x64x64", "1x28x28")
    _one_line_error(capsys, ["project", str(run), "--dataset", "celeba64"], "checkpoint", "1x28x28", "3x64x64")
    _one_line_error(capsys, ["project", str(tmp_path / "nothing")], "checkpoint")


def test_bn_mode_both_reports_running_statistics_too(trained, mnist):
    f, cfg, _ = trained
    r = project(f, mnist, cfg, tasks="noise", k=1, n=16, fid=False, bn_mode="both")
    assert r["proj_noise_psnr_k1"] != r["proj_noise_psnr_k1_bneval"]
    assert r["proj_noise_psnr_k0"] == r["proj_noise_psnr_k0_bneval"]  # the degraded input needs no f
    assert {row["bn"] for row in projection_table(r)} == {"", "eval"}


def test_cli_prints_a_table_and_writes_json(trained, tmp_path, capsys):
    _, _, run = trained
    out = tmp_path / "proj.json"
    code = main(["project", str(run), "--task", "noise", "--task", "mask", "--k", "2", "--n", "32",
                 "--out", str(out), "--figures", str(tmp_path / "figs"), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    for word in ("identity", "ign", "gblur", "harmonic", "psnr", "fid", "acc"):
        assert word in printed
    res = json.loads(out.read_text())
    assert {r["task"] for r in res["rows"]} == {"clean", "noise", "mask"}
    assert "proj_mask_ssim_k2" in res and "proj_sketch_ssim_k1" not in res
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["project_mask.png", "project_noise.png"]


@pytest.mark.slow
def test_eyeglasses_judge_is_trained_and_recorded():
    """The cached Eyeglasses judge (trained once, about 4 minutes on 2 busy cores) is recorded with its
    held-out figures, and they are what it scores on the held-out faces."""
    from harness.project import load_attribute_classifier
    net, info = load_attribute_classifier("Eyeglasses", "cpu")
    assert info["test_n"] > 1000 and info["test_pos"] > 20
    assert info["test_balanced_accuracy"] > 0.9, info
    data = load_dataset("celeba64")
    _, te = celeba_attribute("Eyeglasses")
    with torch.no_grad():
        pred = torch.cat([net(to_model_range(data.test[i:i + 500])) > 0 for i in range(0, len(data.test), 500)])
    assert info["test_accuracy"] == pytest.approx(float((pred == te).double().mean()))
