"""harness.evaluate: metrics at f^1..f^K on tiny real models and data; f is never changed."""
from __future__ import annotations

import math

import pytest
import torch

from harness.config import build_config
from harness.data import Data, load_dataset
from harness.evaluate import evaluate, fixed_noise, generate_k, make_noise
from ign import build_model

K = 3


pytestmark = pytest.mark.usefixtures("no_network")  # everything here must work offline


def tiny_dcgan28(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("dcgan28", width=8, latent=16)


def snapshot(f: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in f.state_dict().items()}


def assert_unchanged(f: torch.nn.Module, before: dict) -> None:
    after = f.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed"


def image_keys(suffix: str = "") -> set[str]:
    keys = {f"drift_real{suffix}"}
    for k in range(1, K + 1):
        keys |= {f"{m}_mnist_k{k}{suffix}" for m in
                 ("fid", "kid", "kid_std", "precision", "recall", "is", "is_std", "modes", "modes_entropy")}
        keys.add(f"idem_k{k}{suffix}")
    return keys


def test_dcgan28_all_keys_finite_and_model_untouched(mnist):
    cfg = build_config({"data.dataset": "mnist", "eval.k": K, "eval.n_samples": 60, "eval.n_reference": 80,
                        "eval.extractors": ["mnist"], "eval.bn_mode": "both", "eval.batch_size": 25,
                        "device": "cpu"})
    f = tiny_dcgan28()
    for training in (True, False):
        f.train(training)
        before = snapshot(f)
        m = evaluate(f, mnist, cfg)
        assert_unchanged(f, before)  # BN running statistics included
        assert f.training is training and all(mod.training is training for mod in f.modules())
    assert set(m) == image_keys() | image_keys("_bneval") | {"n_samples", "bn_mode"}
    assert m["n_samples"] == 60 and m["bn_mode"] == "both"
    bad = {k: v for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)}
    assert not bad
    assert all(1 <= m[f"modes_mnist_k{k}"] <= 10 for k in range(1, K + 1))
    # the fixed noise makes an evaluation a pure function of f
    assert evaluate(f, mnist, cfg) == m


def test_fft_noise_and_eval_mode(mnist):
    cfg = build_config({"data.dataset": "mnist", "noise.name": "fft", "noise.fft_samples": 64, "eval.k": 2,
                        "eval.n_samples": 40, "eval.n_reference": 80, "eval.bn_mode": "eval", "device": "cpu"})
    f = tiny_dcgan28(1)
    before = snapshot(f)
    m = evaluate(f, mnist, cfg, noise=make_noise(cfg, mnist, "cpu"))
    assert_unchanged(f, before)
    assert m["bn_mode"] == "eval" and "fid_mnist_k2" in m and not any(k.endswith("_bneval") for k in m)


def test_toy_mlp2d_all_keys():
    data = load_dataset("ring8")
    cfg = build_config({"data.dataset": "ring8", "eval.k": K, "eval.n_samples": 300, "device": "cpu"})
    torch.manual_seed(0)
    f = build_model("mlp2d", hidden=32, depth=2)
    before = snapshot(f)
    m = evaluate(f, data, cfg)
    assert_unchanged(f, before)
    want = {"n_samples", "bn_mode", "drift_real"} | {f"{p}_k{k}" for k in range(1, K + 1)
                                                      for p in ("swd", "energy", "modes", "near_frac", "idem")}
    assert set(m) == want
    assert all(math.isfinite(v) for k, v in m.items() if k != "bn_mode")


def test_generate_k_is_iteration_and_batch_independent_in_eval_mode():
    f = tiny_dcgan28(2)
    z = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    before = snapshot(f)
    outs = generate_k(f, z, 3, "eval", batch_size=4)
    assert_unchanged(f, before)
    f.eval()
    with torch.no_grad():
        y1 = f(z)
        y2 = f(y1)
        y3 = f(y2)
    for got, want in zip(outs, (y1, y2, y3)):
        torch.testing.assert_close(got, want)
    assert [o.shape for o in generate_k(f, z, 2, "train", batch_size=4)] == [z.shape] * 2
    assert_unchanged(f, before)


def test_fixed_noise_is_fixed_and_device_independent(mnist):
    cfg = build_config({"data.dataset": "mnist", "device": "cpu"})
    noise = make_noise(cfg, mnist, "cpu")
    a = fixed_noise(noise, 11, seed=5, batch_size=4)
    b = fixed_noise(noise, 11, seed=5, batch_size=4)
    assert [len(x) for x in a] == [4, 4, 3]  # near-equal batches: never a batch of 1
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_mnist_extractor_on_faces_is_a_clear_error():
    faces = Data("faces", torch.zeros(4, 3, 64, 64, dtype=torch.uint8), torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    cfg = build_config({"data.dataset": "celeba64", "eval.extractors": ["mnist"], "eval.n_samples": 4,
                        "device": "cpu"})
    with pytest.raises(ValueError, match="eval.extractors: 'mnist' needs 1x28x28"):
        evaluate(build_model("dcgan64", width=4, latent=8), faces, cfg)


@pytest.mark.slow
def test_inception_evaluation(mnist):
    """Inception at a tiny n: keys, the weights hash, and no IS key (or NaN) without the head."""
    from harness.fidelity import extractor_info
    cfg = build_config({"data.dataset": "mnist", "eval.k": 2, "eval.n_samples": 24, "eval.n_reference": 24,
                        "eval.extractors": ["inception"], "device": "cpu"})
    f = tiny_dcgan28(3)
    m = evaluate(f, mnist, cfg)
    info = extractor_info("inception")
    assert m["inception_weights"] == info["hash"]
    for k in (1, 2):
        assert {f"fid_inception_k{k}", f"kid_inception_k{k}", f"precision_inception_k{k}"} <= set(m)
        assert (f"is_inception_k{k}" in m) == info["has_logits"]
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
