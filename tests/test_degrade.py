"""Degradations of appendix C on constructed inputs, against independent numpy computations."""
import numpy as np
import pytest
import torch

from ign import DEGRADATIONS, add_noise, grayscale, mask, sketch
from ign.degrade import degrade

SIGMA_21 = 0.3 * ((21 - 1) * 0.5 - 1) + 0.8   # PyTorch's default sigma for kernel 21 (appendix C)


def test_sigma_21_is_3_5():
    assert SIGMA_21 == pytest.approx(3.5)


def test_add_noise_std_0_15_mean_0():
    x = torch.full((8, 3, 64, 64), 0.3)
    y = add_noise(x, generator=torch.Generator().manual_seed(0))
    n = (y - x).double().flatten()
    N = n.numel()
    assert abs(n.mean().item()) < 5 * 0.15 / N ** 0.5
    assert abs(n.std().item() - 0.15) < 5 * 0.15 / (2 * N) ** 0.5
    assert y.dtype == x.dtype and y.shape == x.shape
    # additive and independent of x; not clipped to [-1, 1]
    x2 = torch.linspace(-1, 1, x.numel()).view_as(x)
    y2 = add_noise(x2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(y2 - x2, y - x, atol=1e-6, rtol=0)
    assert y2.max() > 1 and y2.min() < -1
    assert torch.equal(x, torch.full((8, 3, 64, 64), 0.3))      # input untouched


def test_grayscale_channel_mean_repeated():
    x = torch.rand(2, 3, 5, 7) * 2 - 1
    y = grayscale(x)
    m = (x[:, 0] + x[:, 1] + x[:, 2]) / 3
    assert y.shape == x.shape
    for c in range(3):
        torch.testing.assert_close(y[:, c], m)
    x1 = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(grayscale(x1), x1)                 # one channel (MNIST): identity
    x4 = torch.rand(1, 4, 2, 2)
    torch.testing.assert_close(grayscale(x4), x4.mean(1, keepdim=True).expand(1, 4, 2, 2))


def blur_reference(img: np.ndarray, sigma: float, k: int = 21) -> np.ndarray:
    """Separable Gaussian blur of a (H, W) image, reflect padding (edge not repeated), in numpy."""
    r = k // 2
    t = np.arange(-r, r + 1, dtype=np.float64)
    kern = np.exp(-0.5 * (t / sigma) ** 2)
    kern /= kern.sum()
    p = np.pad(img.astype(np.float64), r, mode="reflect")
    rows_ = np.stack([p[:, j:j + k] @ kern for j in range(img.shape[1])], 1)          # along W
    return np.stack([kern @ rows_[i:i + k, :] for i in range(img.shape[0])], 0)       # along H


def sketch_reference(x: torch.Tensor, sigma: float = SIGMA_21) -> np.ndarray:
    out = []
    for img in x.double().numpy():
        g = (img + 1).mean(0)
        s = g / blur_reference(g, sigma) - 1
        out.append(np.repeat(s[None], img.shape[0], 0))
    return np.stack(out)


@pytest.mark.parametrize("c", [-0.5, 0.0, 0.7, 1.0])
def test_sketch_of_constant_is_zero_everywhere(c):
    """g/blur(g) = 1 for a constant g > 0, including at the borders with reflect padding."""
    x = torch.full((2, 3, 32, 40), c)
    torch.testing.assert_close(sketch(x), torch.zeros_like(x), atol=1e-6, rtol=0)


def test_sketch_step_edge_matches_independent_blur():
    x = torch.full((1, 3, 40, 48), -0.6)
    x[..., :, 20:] = 0.8
    x[:, 0, 10:30, 5:15] += 0.3          # channels differ: the grayscale mean matters
    x[:, 2, 10:30, 5:15] -= 0.6
    y = sketch(x)
    ref = sketch_reference(x)
    np.testing.assert_allclose(y.double().numpy(), ref, atol=2e-5, rtol=0)
    assert np.abs(ref).max() > 0.2                       # edges show up
    # the sigma matters at this tolerance: 3.0 instead of 3.5 is far off
    assert np.abs(sketch_reference(x, 3.0) - ref).max() > 1e-2
    # a single vertical edge: more than the kernel radius (10 px) from it the sketch is exactly 0
    flat = torch.full((1, 3, 64, 64), -0.2)
    flat[..., 32:] = 0.5
    yf = sketch(flat)
    torch.testing.assert_close(yf[..., :, :20], torch.zeros(1, 3, 64, 20), atol=1e-6, rtol=0)
    # left of the edge the blur picks up brighter pixels: darker than 0; right of it: brighter
    assert (yf[..., :, 25:32] < -1e-3).all() and (yf[..., :, 32:39] > 1e-3).all()


def test_sketch_black_regions_are_finite():
    x = torch.full((2, 3, 32, 32), -1.0)
    torch.testing.assert_close(sketch(x), torch.full_like(x, -1.0))    # 0 / (0 + 1e-10) - 1
    x[:, :, 8:24, 8:24] = 1.0                                          # bright square in black
    x[1, :, 0:2, :] = -1.0 + 1e-7                                      # nearly black strip
    y = sketch(x)
    assert torch.isfinite(y).all()
    np.testing.assert_allclose(y.double().numpy(), sketch_reference(x), atol=1e-4, rtol=1e-5)


def test_mask_replaces_exactly_the_box():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 20, generator=g)
    fill = -torch.rand(2, 3, 16, 20, generator=g) - 2        # disjoint from x's values
    x0 = x.clone()
    y = mask(x, box=(3, 5, 4, 7), fill=fill)
    inside = torch.zeros(16, 20, dtype=torch.bool)
    inside[3:7, 5:12] = True
    assert torch.equal(y[..., inside], fill[..., inside])
    assert torch.equal(y[..., ~inside], x[..., ~inside])
    assert torch.equal(x, x0)                                 # not in place


def test_mask_random_box_is_one_rectangle_of_40_percent():
    x = torch.rand(3, 1, 30, 50) + 5                         # noise never reaches [5, 6]
    y = mask(x, generator=torch.Generator().manual_seed(1))
    changed = y != x
    assert torch.equal(changed, changed[:1, :1].expand_as(changed))   # same box for the batch
    rows_ = changed[0, 0].any(1).nonzero().flatten()
    cols = changed[0, 0].any(0).nonzero().flatten()
    assert len(rows_) == 12 and len(cols) == 20                       # round(0.4 * side)
    assert rows_.diff().eq(1).all() and cols.diff().eq(1).all()
    assert changed[0, 0].sum() == 12 * 20                             # a full rectangle
    fill_vals = y[changed]
    assert abs(fill_vals.mean().item()) < 0.3 and 0.8 < fill_vals.std().item() < 1.2   # N(0, 1)


def test_degrade_registry():
    assert set(DEGRADATIONS) == {"noise", "grayscale", "sketch", "mask"}
    x = torch.rand(1, 3, 24, 24) * 2 - 1
    torch.testing.assert_close(degrade("grayscale", x), grayscale(x))
    torch.testing.assert_close(degrade("noise", x, torch.Generator().manual_seed(3)),
                               add_noise(x, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(degrade("sketch", x), sketch(x))
    with pytest.raises(ValueError) as e:
        degrade("blur", x)
    assert "'blur'" in str(e.value) and "sketch" in str(e.value)
