"""harness.fidelity: metrics against independent computations, the offline Inception conversion,
sanity orderings on real data, the on-disk reference cache, the `fid` command.

Real components and real data (shared/data), small sizes. The first run trains the digit classifier
and converts the Inception weights once (both cached under .cache)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from harness import fidelity as fi
from harness.data import PROJECT_ROOT, load_images, to_model_range, to_uint8
from ign import add_noise

N = 400  # digits per set: the classifier's features are 128-d, so covariances are well conditioned


pytestmark = pytest.mark.usefixtures("no_network")  # everything here must work offline


def noisy(imgs: torch.Tensor, sigma: float = 0.15, seed: int = 0) -> torch.Tensor:
    """Additive-noise-degraded images (ign.add_noise, appendix C), as uint8."""
    return to_uint8(add_noise(to_model_range(imgs), sigma, torch.Generator().manual_seed(seed)))


def gaussian_images(n: int, shape=(1, 28, 28), seed: int = 0) -> torch.Tensor:
    return to_uint8(torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(scope="module")
def mnist_sets():
    """Classifier features of train (reference), test, noisy test and Gaussian noise images."""
    test = load_images("mnist-test", N, seed=1)
    return {"train": fi.reference_features("mnist-train", N, "mnist", "cpu"),
            "test": fi.extract(test, "mnist"),
            "noisy": fi.extract(noisy(test), "mnist"),
            "gauss": fi.extract(gaussian_images(N), "mnist")}


# --- independent computations -------------------------------------------------------------------

def frechet_scipy(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def mmd2_unbiased_cubic(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (KID, Binkowski et al. 2018)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m = len(x)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def precision_recall_knn(gen: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: a sample is covered when it lies in some other set's k-NN ball."""
    from scipy.spatial.distance import cdist

    def radii(x):
        d = cdist(x, x)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself
    d_gr = cdist(gen, real)
    precision = (d_gr <= radii(real)[None, :]).any(1).mean()
    recall = (d_gr.T <= radii(gen)[None, :]).any(1).mean()
    return float(precision), float(recall)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # a few ReLU features are dead: scipy warns, stays exact
def test_fid_matches_scipy(mnist_sets):
    for other in ("test", "noisy", "gauss"):
        a, b = mnist_sets[other]["features"], mnist_sets["train"]["features"]
        ours = fi.metrics_from_features(mnist_sets[other], mnist_sets["train"], "mnist")["fid"]
        ref = frechet_scipy(a.numpy(), b.numpy())
        assert ours == pytest.approx(ref, rel=1e-3), other


def test_fid_with_fewer_samples_than_dimensions():
    """The N x N route (CPU sample sizes, 2048-d Inception) equals torch-fidelity's eigenvalue route
    and scipy's sqrtm on the same features."""
    from torch_fidelity.metric_fid import fid_features_to_statistics as stats, fid_statistics_to_metric
    g = torch.Generator().manual_seed(0)
    a = torch.randn(150, 300, generator=g, dtype=torch.float64).relu()
    b = 1.2 * torch.randn(120, 300, generator=g, dtype=torch.float64).relu() + 0.1
    ours = fi.frechet_distance(a, b)
    assert ours == pytest.approx(fid_statistics_to_metric(stats(a), stats(b), False)["frechet_inception_distance"],
                                 rel=1e-6)
    assert ours == pytest.approx(frechet_scipy(a.numpy(), b.numpy()), rel=1e-3)


def test_kid_matches_unbiased_cubic_mmd(mnist_sets):
    # Subset size = n: every subset is the whole set, so the mean is one MMD over all samples.
    a, b = mnist_sets["noisy"], mnist_sets["train"]
    m = fi.metrics_from_features(a, b, "mnist")
    assert m["kid"] == pytest.approx(mmd2_unbiased_cubic(a["features"].numpy(), b["features"].numpy()), rel=1e-6)
    assert m["kid_std"] == 0.0


def test_kid_subsets_match_independent_draws():
    # n > 1000: 100 subsets of 1000, drawn as torch-fidelity draws them (RandomState(seed).choice).
    imgs = load_images("mnist-test", 1100, seed=2)
    a = fi.extract(imgs, "mnist")
    b = fi.extract(noisy(imgs, 0.3, seed=3), "mnist")
    m = fi.metrics_from_features(a, b, "mnist", kid_subsets=10, seed=7)
    rng = np.random.RandomState(7)
    fa, fb = a["features"].numpy(), b["features"].numpy()
    mmds = [mmd2_unbiased_cubic(fa[rng.choice(1100, 1000, replace=False)], fb[rng.choice(1100, 1000, replace=False)])
            for _ in range(10)]
    assert m["kid"] == pytest.approx(np.mean(mmds), rel=1e-6)
    assert m["kid_std"] == pytest.approx(np.std(mmds), rel=1e-4)


def test_precision_recall_match_knn(mnist_sets):
    for other in ("test", "noisy"):
        g, r = mnist_sets[other], mnist_sets["train"]
        m = fi.metrics_from_features(g, r, "mnist")
        p, rc = precision_recall_knn(g["features"].numpy(), r["features"].numpy())
        # torch-fidelity averages in float32
        assert (m["precision"], m["recall"]) == pytest.approx((p, rc), abs=1e-6), other


def test_inception_score_matches_definition(mnist_sets):
    logits = mnist_sets["test"]["logits"]
    m = fi.metrics_from_features(mnist_sets["test"], mnist_sets["train"], "mnist", seed=5)
    p = torch.softmax(logits, 1)[torch.from_numpy(np.random.RandomState(5).permutation(len(logits)))]
    scores = []
    for chunk in torch.tensor_split(p, 10):  # N divisible by 10: the same chunks as torch-fidelity
        q = chunk.mean(0, keepdim=True)
        scores.append(math.exp(float((chunk * (chunk.log() - q.log())).sum(1).mean())))
    assert m["is"] == pytest.approx(np.mean(scores), rel=1e-9)
    assert m["is_std"] == pytest.approx(np.std(scores), rel=1e-6)


def test_matches_torch_fidelity_end_to_end():
    """Our in-memory path gives what torch-fidelity's own calculate_metrics gives through the
    registered "mnist-cnn" extractor (uint8 datasets, its data loader, its metric code)."""
    import torch_fidelity

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    a, b = load_images("mnist-test", 200, seed=4), load_images("mnist-train", 200, seed=4)
    tf = torch_fidelity.calculate_metrics(
        input1=Images(a), input2=Images(b), feature_extractor=fi.TF_MNIST, cuda=False, save_cpu_ram=True,
        cache=False, verbose=False, fid=True, kid=True, prc=True, isc=True, kid_subset_size=200, batch_size=50)
    ours = fi.metrics_from_features(fi.extract(a, "mnist"), fi.extract(b, "mnist"), "mnist")
    assert ours["fid"] == pytest.approx(tf["frechet_inception_distance"], rel=1e-5)
    assert ours["kid"] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["precision"] == pytest.approx(tf["precision"], abs=1e-9)
    assert ours["recall"] == pytest.approx(tf["recall"], abs=1e-9)
    assert ours["is"] == pytest.approx(tf["inception_score_mean"], rel=1e-5)


# --- sanity on real data --------------------------------------------------------------------------

def test_sanity_ordering_mnist_extractor(mnist_sets):
    m = {k: fi.metrics_from_features(mnist_sets[k], mnist_sets["train"], "mnist") for k in ("test", "noisy", "gauss")}
    assert m["test"]["fid"] < m["noisy"]["fid"] < m["gauss"]["fid"]
    assert m["test"]["kid"] < m["noisy"]["kid"] < m["gauss"]["kid"]
    assert m["test"]["precision"] > 0.5 and m["test"]["recall"] > 0.5
    assert m["gauss"]["precision"] < 0.05
    assert m["test"]["modes"] == 10 and m["test"]["modes_entropy"] > 2.25  # log 10 = 2.303
    print({k: (round(v["fid"], 3), round(v["kid"], 5)) for k, v in m.items()})


def test_converted_inception_matches_torchscript():
    info = fi.extractor_info("inception")
    assert len(info["hash"]) == 12
    if info["source"] != "converted":
        pytest.skip(f"Inception weights come from {info['source']}, not the conversion")
    assert fi.check_converted_inception(Path(info["path"])) < 1e-4          # random 64x64 RGB
    ts = fi._load_torchscript().eval()
    digits = load_images("mnist-test", 3, seed=0)                            # real 28x28 grey digits
    with torch.no_grad():
        want = ts(fi._tf_resized(digits.expand(-1, 3, -1, -1))).reshape(3, -1).double()
    got = fi.extract(digits, "inception")
    assert got["logits"] is None and got["features"].shape == (3, 2048)
    assert float((got["features"] - want).abs().max()) < 1e-4


def test_inception_weights_with_head_give_is(tmp_path):
    """With a weights file that has the 1008-way head (as torch-fidelity's own download), the stock
    extractor is used and IS appears; the head here is random, only the code path is checked."""
    sd = torch.load(fi.extractor_info("inception")["path"], weights_only=True)
    g = torch.Generator().manual_seed(0)
    sd["fc.weight"], sd["fc.bias"] = 0.01 * torch.randn(1008, 2048, generator=g), torch.zeros(1008)
    path = tmp_path / "with-head.pth"
    torch.save(sd, path)
    info = fi.extractor_info("inception", weights=path)
    assert info["has_logits"] and info["source"] == "argument" and info["torch_fidelity_name"] == fi.TF_INCEPTION
    assert info["hash"] != fi.extractor_hash("inception")  # other weights, other cache keys
    x = gaussian_images(6, (3, 32, 32))
    feats = fi.extract(x, "inception", weights=path)
    assert feats["logits"].shape == (6, 1008)
    m = fi.metrics_from_features(feats, feats, "inception")
    assert math.isfinite(m["is"]) and "modes" not in m


@pytest.mark.slow
def test_sanity_ordering_inception():
    n = 100  # 400 images through Inception (~20 s on 2 cores); FID is biased at this n, the order is not
    test = load_images("mnist-test", n, seed=1)
    ref = fi.reference_features("mnist-train", n, "inception", "cpu")
    m = {name: fi.metrics_from_features(fi.extract(x, "inception"), ref, "inception")
         for name, x in (("test", test), ("noisy", noisy(test)), ("gauss", gaussian_images(n)))}
    assert m["test"]["fid"] < m["noisy"]["fid"] < m["gauss"]["fid"]
    assert m["test"]["kid"] < m["noisy"]["kid"] < m["gauss"]["kid"]
    assert all("is" not in v for v in m.values()) or fi.extractor_info("inception")["has_logits"]
    assert all(math.isfinite(x) for v in m.values() for x in v.values())
    print({k: (round(v["fid"], 2), round(v["kid"], 4)) for k, v in m.items()})


# --- the reference cache ---------------------------------------------------------------------------

def test_reference_cache_reused_in_new_process(tmp_path):
    first = fi.reference_features("mnist-test", 64, "mnist", "cpu", seed=3, cache_dir=tmp_path)
    assert first["hit"] is False and Path(first["path"]).parent == tmp_path / "refs"
    assert fi.extractor_hash("mnist") in Path(first["path"]).name
    mtime = os.stat(first["path"]).st_mtime_ns
    code = (
        "import socket, json, sys\n"
        "def refuse(*a, **k): raise RuntimeError('network')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse\n"
        "import harness.fidelity as fi, harness.fidelity\n"
        "fi.extract = None  # a recomputation would crash here\n"
        f"r = fi.reference_features('mnist-test', 64, 'mnist', 'cpu', seed=3, cache_dir={str(tmp_path)!r})\n"
        "print(json.dumps({'hit': r['hit'], 'path': r['path'], 'sum': float(r['features'].sum())}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT,
                         env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    second = json.loads(res.stdout.strip().splitlines()[-1])
    assert second["hit"] is True and second["path"] == first["path"]
    assert second["sum"] == pytest.approx(float(first["features"].sum()), rel=1e-6)
    assert os.stat(first["path"]).st_mtime_ns == mtime
    # a different n or seed is a different entry
    assert fi.reference_path("mnist-test", 65, "mnist", 3, tmp_path) != Path(first["path"])
    assert fi.reference_path("mnist-test", 64, "mnist", 4, tmp_path) != Path(first["path"])


# --- compare_sets, folders and the CLI --------------------------------------------------------------

def test_compare_folder_with_named_set(tmp_path):
    from PIL import Image
    imgs = load_images("mnist-test", 40, seed=0)
    for i, x in enumerate(imgs):
        Image.fromarray(x[0].numpy()).save(tmp_path / f"{i:03d}.png")
    out = fi.compare_sets(str(tmp_path), "mnist-test", "mnist", n=40, seed=0, progress=False)
    assert abs(out["fid"]) < 1e-6  # the same 40 digits (PNG is lossless), in another order
    assert out["modes"] >= 8 and out["weights"] == fi.extractor_hash("mnist")
    assert set(out) >= {"fid", "kid", "kid_std", "precision", "recall", "is", "is_std", "a", "b", "n", "extractor"}


def test_fid_command(capsys):
    from harness.cli import main
    assert main(["fid", "mnist-test", "mnist-train", "--extractor", "mnist", "--n", "100", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["extractor"] == "mnist" and out["n"] == 100 and out["fid"] > 0 and out["is"] > 5
    assert main(["fid", "no-such-set", "mnist-train", "--extractor", "mnist", "--n", "10"]) == 2
    err = capsys.readouterr().err
    assert "no-such-set" in err and "mnist-train" in err and len(err.strip().splitlines()) == 1


def test_bad_input_is_one_line_value_error():
    with pytest.raises(ValueError, match="extractor: unknown value 'vgg'; allowed: inception, mnist"):
        fi.extract(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "vgg")
    with pytest.raises(ValueError, match="mnist extractor takes"):
        fi.extract(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), "mnist")
    with pytest.raises(ValueError, match="n: 70000 images requested"):
        fi.reference_features("mnist-test", 70000, "mnist")
