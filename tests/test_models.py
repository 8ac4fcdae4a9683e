"""Model registry (Table 1 of appendix C, layer by layer) and the operations that apply f:
apply_k (f^k with every intermediate), interpolation and latent arithmetic."""
import pytest
import torch
from torch import nn

from ign import MODELS, apply_k, arithmetic, build_model, interpolate

# Table 1, appendix C: (operation, kernel, stride, padding, feature maps, BN?, nonlinearity)
TABLE1_ENCODER = [
    ("conv", 4, 2, 1, 64, False, "lrelu"),
    ("conv", 4, 2, 1, 128, True, "lrelu"),
    ("conv", 4, 2, 1, 256, True, "lrelu"),
    ("conv", 4, 2, 1, 512, True, "lrelu"),
    ("conv", 4, 1, 0, 512, False, None),
]
TABLE1_DECODER = [
    ("convT", 4, 1, 0, 512, True, "relu"),
    ("convT", 4, 2, 1, 256, True, "relu"),
    ("convT", 4, 2, 1, 128, True, "relu"),
    ("convT", 4, 2, 1, 64, True, "relu"),
    ("convT", 4, 2, 1, 3, False, "tanh"),
]
ACT = {nn.LeakyReLU: "lrelu", nn.ReLU: "relu", nn.Tanh: "tanh"}


def walk(seq: nn.Sequential, in_channels: int):
    """Group a Sequential into (op, k, s, p, out, bn, act) rows, checking channel chaining and
    that nothing but conv / BN / activation appears."""
    mods, rows, i, c = list(seq), [], 0, in_channels
    while i < len(mods):
        conv = mods[i]
        assert type(conv) in (nn.Conv2d, nn.ConvTranspose2d), f"expected a convolution, got {conv}"
        assert conv.in_channels == c and conv.groups == 1 and conv.dilation == (1, 1)
        assert conv.kernel_size[0] == conv.kernel_size[1] and conv.stride[0] == conv.stride[1]
        assert conv.padding[0] == conv.padding[1]
        if isinstance(conv, nn.ConvTranspose2d):
            assert conv.output_padding == (0, 0)
        c, i = conv.out_channels, i + 1
        bn = i < len(mods) and isinstance(mods[i], nn.BatchNorm2d)
        if bn:
            assert mods[i].num_features == c and mods[i].affine and mods[i].track_running_stats
            i += 1
        act = None
        if i < len(mods) and type(mods[i]) in ACT:
            act = ACT[type(mods[i])]
            if act == "lrelu":
                assert mods[i].negative_slope == 0.2
            i += 1
        rows.append(("conv" if isinstance(conv, nn.Conv2d) else "convT", conv.kernel_size[0],
                     conv.stride[0], conv.padding[0], c, bn, act))
    return rows


@pytest.fixture(scope="module")
def dcgan64():
    torch.manual_seed(0)
    return build_model("dcgan64")


def test_dcgan64_is_table1(dcgan64):
    f = dcgan64
    assert set(dict(f.named_children())) == {"encoder", "decoder"}
    assert walk(f.encoder, 3) == TABLE1_ENCODER
    assert walk(f.decoder, 512) == TABLE1_DECODER
    assert f.shape == (3, 64, 64)


def test_dcgan64_init(dcgan64):
    """Weights N(0, 0.02) and zero biases (Table 1). BN scales are N(1, 0.02) as in DCGAN: with
    the literal N(0, 0.02) every BN layer would start by multiplying its output by ~0.02."""
    convs = [m for m in dcgan64.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 10
    for m in convs:
        w = m.weight.detach().double()
        tol = 5 * 0.02 / w.numel() ** 0.5          # 5 standard errors of the estimates
        assert abs(w.mean().item()) < tol, m
        assert abs(w.std().item() - 0.02) < max(tol, 1e-4), m
        assert m.bias is None or torch.count_nonzero(m.bias) == 0
    for m in dcgan64.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.count_nonzero(m.bias) == 0
            assert abs(m.weight.mean().item() - 1) < 5 * 0.02 / m.num_features ** 0.5
            assert 0.01 < m.weight.std().item() < 0.03
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))


def test_dcgan64_shape_and_range(dcgan64):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    code = dcgan64.encoder(x)
    assert code.shape == (2, 512, 1, 1)                   # "Decoder – 512 × 1 × 1 input"
    y = dcgan64(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.abs().max() < 1 and y.std() > 0               # tanh output, not constant


def test_dcgan28_shape():
    torch.manual_seed(0)
    f = build_model("dcgan28")
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert f.encoder(x).shape == (3, 512, 1, 1)
    y = f(x)
    assert y.shape == x.shape and y.abs().max() < 1
    assert f.shape == (1, 28, 28)
    rows = walk(f.encoder, 1)
    assert rows[0][5] is False and rows[-1][5:] == (False, None)   # first conv and code: no BN
    assert [r[4] for r in walk(f.decoder, 512)][-1] == 1
    # the family's conventions hold here too
    assert all(r[6] == "lrelu" for r in rows[:-1])
    assert walk(f.decoder, 512)[-1][5:] == (False, "tanh")


def test_mlp2d_shape():
    torch.manual_seed(0)
    f = build_model("mlp2d")
    x = torch.randn(17, 2)
    y = f(x)
    assert y.shape == (17, 2) and f.shape == (2,)
    # per-point: no BN, so a point's image does not depend on the rest of the batch
    torch.testing.assert_close(f(x[:5]), y[:5])


def test_unknown_model_names_allowed_values():
    with pytest.raises(ValueError) as e:
        build_model("resnet")
    msg = str(e.value)
    assert "'resnet'" in msg
    for name in ("dcgan28", "dcgan64", "mlp2d"):
        assert name in msg
    assert set(MODELS) >= {"dcgan28", "dcgan64", "mlp2d"}


@pytest.mark.parametrize("name,kw", [("dcgan28", {"width": 8, "latent": 16}), ("mlp2d", {})])
def test_deterministic_under_seed(name, kw):
    def build(seed):
        torch.manual_seed(seed)
        return build_model(name, **kw).state_dict()
    a, b, c = build(3), build(3), build(4)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].std() > 0)


# ---------------------------------------------------------------- apply_k, interpolate, arithmetic
class Affine(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        with torch.no_grad():
            self.lin.weight.copy_(torch.arange(16.0).view(4, 4) / 40 - 0.2)
            self.lin.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_apply_k_each_step_from_previous_with_k_calls(k):
    f = Affine()
    calls = []
    f.register_forward_hook(lambda m, inp, out: calls.append(inp[0].clone()))
    z = torch.randn(3, 4)
    outs = apply_k(f, z, k)
    assert len(outs) == k and len(calls) == k
    prev = z
    for i, y in enumerate(outs):
        torch.testing.assert_close(calls[i], prev)         # step i is fed the previous output
        torch.testing.assert_close(y, f(prev).detach())
        assert not y.requires_grad
        prev = y
    W, b = f.lin.weight.detach(), f.lin.bias.detach()
    direct = z
    for _ in range(k):
        direct = direct @ W.T + b
    torch.testing.assert_close(outs[-1], direct)


def test_apply_k_rejects_k_below_one():
    with pytest.raises(ValueError, match="k"):
        apply_k(Affine(), torch.zeros(1, 4), 0)


def test_interpolate_endpoints_and_linearity():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    path = interpolate(z0, z1, 7)
    assert path.shape == (7, 2, 5, 3)
    torch.testing.assert_close(path[0], z0)
    torch.testing.assert_close(path[-1], z1)
    for i in range(7):
        torch.testing.assert_close(path[i], z0 + (i / 6) * (z1 - z0))
    # equal steps: second differences vanish
    torch.testing.assert_close(path[2:] - 2 * path[1:-1] + path[:-2], torch.zeros(5, 2, 5, 3), atol=1e-6, rtol=0)
    assert interpolate(z0, z1, 2).shape == (2, 2, 5, 3)


def test_arithmetic():
    g = torch.Generator().manual_seed(1)
    zp, zn, z = (torch.randn(2, 4, generator=g) for _ in range(3))
    out = arithmetic(zp, zn, z)
    torch.testing.assert_close(out, zp - zn + z)
    # with a linear f the edit commutes with f
    f = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        torch.testing.assert_close(f(out), f(zp) - f(zn) + f(z))
