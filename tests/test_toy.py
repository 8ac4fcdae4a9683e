"""2-D toy distributions and the distances used to check Theorem 1 on them."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from ign import TOYS, energy_distance, mode_coverage, sliced_wasserstein, toy_sample


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_ring8_sampler():
    n = 8000
    pts, lab = toy_sample("ring8", n, gen(0))
    assert pts.shape == (n, 2) and pts.dtype == torch.float32
    assert lab.shape == (n,) and set(lab.tolist()) == set(range(8))
    counts = torch.bincount(lab, minlength=8).double()
    sd = math.sqrt(n * (1 / 8) * (7 / 8))
    assert ((counts - n / 8).abs() < 5 * sd).all()
    angle = lab.double() * (2 * math.pi / 8)
    centers = 2.0 * torch.stack([angle.cos(), angle.sin()], 1)
    off = pts.double() - centers
    assert off.std(0).sub(0.05).abs().max() < 5 * 0.05 / math.sqrt(2 * n)   # std 0.05 per axis
    assert off.mean(0).abs().max() < 5 * 0.05 / math.sqrt(n)
    torch.testing.assert_close(toy_sample("ring8", 10, gen(0))[0], toy_sample("ring8", 10, gen(0))[0])


def test_moons_sampler():
    n = 8000
    pts, lab = toy_sample("moons", n, gen(1))
    assert pts.shape == (n, 2) and set(lab.tolist()) == {0, 1}
    assert abs(lab.double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(n)
    assert pts.double().mean(0).abs().max() < 0.05                          # centred
    # make_moons geometry: unit half circles around (0, 0) (upper) and (1, 0.5) (lower), shifted
    c0 = torch.tensor([-0.5, -0.25], dtype=torch.float64)
    c1 = torch.tensor([0.5, 0.25], dtype=torch.float64)
    p = pts.double()
    r0 = (p[lab == 0] - c0).norm(dim=1)
    r1 = (p[lab == 1] - c1).norm(dim=1)
    assert abs(r0.mean().item() - 1) < 0.01 and abs(r1.mean().item() - 1) < 0.01
    assert ((p[lab == 0] - c0)[:, 1] > -0.2).all() and ((p[lab == 1] - c1)[:, 1] < 0.2).all()


def test_unknown_toy():
    assert set(TOYS) == {"ring8", "moons"}
    with pytest.raises(ValueError, match="'spiral'"):
        toy_sample("spiral", 10)


def stratified_ring(seed, per_mode=200):
    """Two i.i.d. ring8 samples differ in their per-mode counts (±√n), and that alone moves the
    sorted projections across the gaps between modes: SW ≈ 0.2 at n = 1500, a floor that shrinks
    only like n^(-1/4). Equal counts per mode isolate the within-mode sampling error."""
    pts, lab = toy_sample("ring8", 4000, gen(seed))
    return torch.cat([pts[lab == k][:per_mode] for k in range(8)])


@pytest.fixture(scope="module", params=["ring8", "gaussian"])
def same_dist(request):
    if request.param == "ring8":
        return stratified_ring(10), stratified_ring(11), 0.05
    g = gen(12)
    return torch.randn(1600, 2, generator=g), torch.randn(1600, 2, generator=g), 0.25


def test_sliced_wasserstein(same_dist):
    a, b, ratio = same_dist
    shift = torch.tensor([0.6, -0.3])
    same = sliced_wasserstein(a, b)
    moved = sliced_wasserstein(a, b + shift)
    assert sliced_wasserstein(a, a) == 0.0
    assert same < ratio * moved
    # a translation moves every sorted projection by s·θ: SW = sqrt(mean (s·θ)²) ≈ |s| / √2 in 2-D
    assert sliced_wasserstein(a, a + shift) == pytest.approx(shift.norm().item() / math.sqrt(2), rel=0.1)
    assert sliced_wasserstein(a, b) == pytest.approx(sliced_wasserstein(b, a), rel=1e-12)
    with pytest.raises(ValueError, match="shapes"):
        sliced_wasserstein(a, b[:-1])


def test_sliced_wasserstein_1d_is_exact_w2():
    """In 1-D every projection is ±identity: SW2 is W2 between sorted samples."""
    g = np.random.default_rng(0)
    u, v = g.normal(size=300), g.normal(1.0, 2.0, size=300)
    expected = math.sqrt(np.mean((np.sort(u) - np.sort(v)) ** 2))
    got = sliced_wasserstein(torch.from_numpy(u)[:, None], torch.from_numpy(v)[:, None], n_proj=8)
    assert got == pytest.approx(expected, rel=1e-10)


def energy_reference(a: np.ndarray, b: np.ndarray) -> float:
    def mean_dist(p, q):
        return np.sqrt(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)).mean()
    return 2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)


def test_energy_distance(same_dist):
    a, b, _ = same_dist
    shifted = b + torch.tensor([0.6, -0.3])
    same, moved = energy_distance(a, b), energy_distance(a, shifted)
    assert 0 <= same < 0.02 * moved
    assert energy_distance(a, a) == pytest.approx(0, abs=1e-9)
    g = np.random.default_rng(1)
    p, q = g.normal(size=(200, 2)), g.normal(0.3, 1.5, size=(150, 2))     # unequal sizes allowed
    assert energy_distance(torch.from_numpy(p), torch.from_numpy(q)) == pytest.approx(energy_reference(p, q), rel=1e-9)
    assert energy_distance(a[:300], shifted[:200]) == pytest.approx(
        energy_reference(a[:300].double().numpy(), shifted[:200].double().numpy()), rel=1e-6)


def test_energy_distance_1d_matches_scipy():
    """scipy.stats.energy_distance is the square root of 2E|X-Y| - E|X-X'| - E|Y-Y'| (1-D)."""
    g = np.random.default_rng(2)
    u, v = g.normal(size=250), g.exponential(size=180)
    ours = energy_distance(torch.from_numpy(u)[:, None], torch.from_numpy(v)[:, None])
    assert ours == pytest.approx(scipy.stats.energy_distance(u, v) ** 2, rel=1e-8)


def test_mode_coverage_ring():
    pts, lab = toy_sample("ring8", 1500, gen(20))   # > 1 chunk of 1024
    full = mode_coverage(pts, "ring8")
    assert full["modes"] == 8.0 and full["modes_total"] == 8.0 and full["near_frac"] > 0.99
    few = mode_coverage(pts[lab < 3], "ring8")
    assert few["modes"] == 3.0 and few["modes_total"] == 8.0 and few["near_frac"] > 0.99
    # a mode with only a token share (below min_share of 1/8) does not count
    token = torch.cat([pts[lab < 3], pts[lab == 5][:2]])
    assert mode_coverage(token, "ring8")["modes"] == 3.0
    # points between the modes hit none
    far = mode_coverage(torch.zeros(50, 2), "ring8")
    assert far["modes"] == 0.0 and far["near_frac"] == 0.0


def test_mode_coverage_moons():
    pts, lab = toy_sample("moons", 600, gen(21))
    assert mode_coverage(pts, "moons")["modes"] == 2.0
    assert mode_coverage(pts[lab == 1], "moons")["modes"] == 1.0
