"""Noise sources: standard Gaussian, and FFT noise whose spectrum has the data's per-frequency
mean and variance (§2.3), checked by z-scores against the sampling error."""
from pathlib import Path

import pytest
import scipy.stats
import torch

from ign import NOISES, build_noise, fft_stats, sample_fft

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
Z_MAX = 5.5  # per-statistic |z| bound; ~1e-7 two-sided tail each, a few thousand statistics per test


def test_gaussian_is_standard_normal():
    noise = build_noise("gaussian", (4, 8, 8))
    g = torch.Generator().manual_seed(0)
    z = noise.sample(1000, generator=g)
    assert z.shape == (1000, 4, 8, 8) and z.dtype == torch.float32
    v = z.double().flatten()
    n = v.numel()
    assert abs(v.mean().item()) < 5 / n ** 0.5
    assert abs(v.std().item() - 1) < 5 / (2 * n) ** 0.5
    assert scipy.stats.kstest(v[:50000].numpy(), "norm").pvalue > 1e-3
    # no correlation between neighbouring entries
    assert abs(torch.corrcoef(torch.stack([v[:-1], v[1:]]))[0, 1].item()) < 5 / n ** 0.5
    # reproducible from the generator; follows the batch's device/shape contract
    assert torch.equal(noise.sample(1000, generator=torch.Generator().manual_seed(0)), z)
    assert noise.sample(2, batch=torch.zeros(5, 4, 8, 8)).shape == (2, 4, 8, 8)


def spectrum_moments(noise: torch.Tensor):
    spec = torch.fft.fft2(noise.double())
    return spec.real.mean(0), spec.real.var(0), spec.imag.mean(0), spec.imag.var(0)


def assert_spectrum_matches(noise: torch.Tensor, stats: dict, zmax: float = Z_MAX):
    """For each frequency, channel and part: |mean - μ| within zmax·σ/√n, and the sample variance
    within zmax·σ²·√(2/(n-1)) of σ² (each part is Gaussian, so these are the exact sampling errors).
    Where the fitted σ is 0 (imaginary part at self-mirror frequencies) the part must be ~0.
    Returns the mask of frequencies with a non-zero fitted σ of the imaginary part."""
    n = noise.shape[0]
    m_re, v_re, m_im, v_im = spectrum_moments(noise)
    scale = max(stats["std_re"].max().item(), stats["std_im"].max().item())
    for part, m, v in (("re", m_re, v_re), ("im", m_im, v_im)):
        mu, sd = stats[f"mean_{part}"], stats[f"std_{part}"]
        live = sd > 1e-9 * scale
        zm = (m - mu)[live] / (sd[live] / n ** 0.5)
        zv = (v - sd.square())[live] / (sd.square()[live] * (2 / (n - 1)) ** 0.5)
        assert zm.abs().max() < zmax, (part, zm.abs().max())
        assert zv.abs().max() < zmax, (part, zv.abs().max())
        # and not trivially: the variances really are matched, not off by the factor 2 of the
        # Hermitian average (that would give z of order √(n/2))
        assert (v[live] / sd.square()[live]).mean().item() == pytest.approx(1, abs=0.02)
        dead = ~live
        if dead.any():
            assert (m - mu)[dead].abs().max() < 1e-5 * scale and v[dead].max() < (1e-5 * scale) ** 2
    return live


@pytest.fixture(scope="module")
def mnist():
    from torchvision.datasets import MNIST
    if not (DATA_ROOT / "MNIST" / "raw").is_dir():
        pytest.skip(f"no MNIST under {DATA_ROOT}")
    ds = MNIST(str(DATA_ROOT), train=False, download=False)
    return (ds.data[:3000].float() / 255 * 2 - 1).unsqueeze(1)   # (3000, 1, 28, 28) in [-1, 1]


def test_fft_noise_has_mnist_spectrum(mnist):
    noise_src = build_noise("fft", (1, 28, 28), data=mnist)
    stats = noise_src.stats
    # the fitted statistics are those of fft2 of the data (independent recomputation)
    spec = torch.fft.fft2(mnist.double())
    torch.testing.assert_close(stats["mean_re"], spec.real.mean(0))
    torch.testing.assert_close(stats["std_im"], spec.imag.std(0, unbiased=False))
    z = noise_src.sample(6000, generator=torch.Generator().manual_seed(0))
    assert z.shape == (6000, 1, 28, 28) and z.dtype == torch.float32 and torch.isfinite(z).all()
    live = assert_spectrum_matches(z, stats)
    # only DC and the three Nyquist bins have a purely real spectrum for a 28x28 real image
    assert int((~live).sum()) == 4
    # the noise looks like the data at the pixel level too: mean image of the noise ≈ mean digit
    torch.testing.assert_close(z.double().mean(0), mnist.double().mean(0), atol=0.05, rtol=0)


def structured_data(shape, n=3000, seed=0):
    """Real images with a non-trivial spectrum: a fixed pattern (non-zero spectral mean at a few
    frequencies), anisotropic correlated noise (frequency-dependent variance), a random-amplitude
    cosine (variance concentrated at one frequency pair) and a little white noise."""
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    ii = torch.arange(h, dtype=torch.float64)[:, None]
    jj = torch.arange(w, dtype=torch.float64)[None, :]
    pattern = 0.3 + 0.5 * torch.cos(2 * torch.pi * (2 * ii / h + jj / w) + 0.7)
    white = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    corr = white.cumsum(-1) / w ** 0.5                         # red noise along W only
    corr = corr - corr.mean(-1, keepdim=True)
    amp = torch.randn(n, c, 1, 1, generator=g, dtype=torch.float64)
    wave = amp * torch.sin(2 * torch.pi * ii / h * 1)
    chan = torch.arange(1, c + 1, dtype=torch.float64).view(1, c, 1, 1)
    return (pattern + chan * corr + wave + 0.1 * torch.randn(n, c, h, w, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("shape", [(2, 15, 11), (3, 10, 7)], ids=["odd", "even-odd"])
def test_fft_noise_has_spectrum_of_structured_data(shape):
    data = structured_data(shape)
    stats = fft_stats(data)
    sd = torch.cat([stats["std_re"].flatten(), stats["std_im"].flatten()])
    assert sd.max() > 10 * sd[sd > 1e-6].min()                  # a non-trivial spectrum
    noise = sample_fft(stats, 6000, generator=torch.Generator().manual_seed(1))
    assert noise.shape == (6000, *shape)
    live = assert_spectrum_matches(noise, stats)
    c, h, w = shape
    # the imaginary part is identically 0 at DC and at the Nyquist bins of even sides, nowhere else
    n_self = (1 + (h % 2 == 0)) * (1 + (w % 2 == 0))
    assert int((~live).sum()) == c * n_self


def test_fft_batch_mode_uses_the_batch():
    shape = (2, 9, 8)
    data = structured_data(shape, n=500, seed=2)
    src = build_noise("fft", shape, data=data, stats="batch")
    # a batch of one repeated image has zero spectral variance: the noise is that image exactly
    img = structured_data(shape, n=1, seed=3)
    z = src.sample(4, batch=img.repeat(6, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, img.expand(4, *shape), atol=1e-5, rtol=0)
    # a batch with other statistics: the noise follows the batch, not the data set
    batch = 3 * structured_data(shape, n=400, seed=4) + 2
    bstats = fft_stats(batch)
    z = src.sample(6000, batch=batch, generator=torch.Generator().manual_seed(1))
    assert_spectrum_matches(z, bstats)
    # without a batch (evaluation) it falls back to the data-set statistics
    z = src.sample(6000, generator=torch.Generator().manual_seed(2))
    assert_spectrum_matches(z, src.stats)
    # and 'dataset' mode ignores the batch's statistics
    dsrc = build_noise("fft", shape, data=data)
    z = dsrc.sample(6000, batch=batch, generator=torch.Generator().manual_seed(3))
    assert_spectrum_matches(z, dsrc.stats)


def test_fft_statistics_are_fixed_in_dataset_mode():
    shape = (1, 6, 6)
    data = structured_data(shape, n=200)
    src = build_noise("fft", shape, data=data)
    before = {k: v.clone() for k, v in src.stats.items()}
    src.sample(10, batch=data[:5] * 7)
    assert all(torch.equal(before[k], src.stats[k]) for k in before)


@pytest.mark.parametrize("shape", [(2,), (28, 28), (1, 1, 28, 28)])
def test_fft_needs_image_shape(shape):
    with pytest.raises(ValueError, match="fft"):
        build_noise("fft", shape, data=torch.zeros(4, *shape))


def test_fft_errors_and_registry():
    with pytest.raises(ValueError, match="data"):
        build_noise("fft", (1, 4, 4))
    with pytest.raises(ValueError, match="fft_stats"):
        build_noise("fft", (1, 4, 4), data=torch.zeros(2, 1, 4, 4), stats="running")
    with pytest.raises(ValueError) as e:
        build_noise("uniform", (2,))
    assert "'uniform'" in str(e.value) and "fft" in str(e.value) and "gaussian" in str(e.value)
    assert set(NOISES) >= {"gaussian", "fft"}
