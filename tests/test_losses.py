"""The IGN objective: gradient paths against closed forms, the clamp, Source Code 1, train_step.

With a linear f(v) = W v every term of eq. 11 has a closed-form gradient, so the gradient paths of
eqs. 8, 10 and 13 (θ through the inner f only for L_idem, through the outer f only for L_tight) are
checked exactly rather than by plausibility. Rows of the matrices below are the vectors f acts on:
samples for nn.Linear, pixels for a 1x1 convolution. `norm` is N·d (batch size × dims per sample),
because D is a per-sample mean over dims followed by a batch mean.
"""
import copy
import math

import pytest
import torch
from torch import nn

from ign import LossConfig, build_model, ign_losses, lambda_tight_at, per_sample_distance, train_step

DISTANCES = ["l1", "l2"]
TERMS = ["rec", "idem", "tight"]


# ---------------------------------------------------------------- linear f and its closed forms
class Conv1x1(nn.Module):
    """f(x) = W x at every pixel: a bias-free 1x1 convolution, exposing W as `weight` (C, C)."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c, c, dtype=torch.float64))

    def forward(self, x):
        return torch.einsum("oc,nchw->nohw", self.weight, x)


def rows(t):
    """The vectors f acts on, one per row: (N, d) stays; (N, C, H, W) -> (N*H*W, C)."""
    return t if t.dim() == 2 else t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def sample_of_row(t):
    """Index of the sample each row of rows(t) belongs to."""
    n = t.shape[0]
    per = 1 if t.dim() == 2 else t.shape[2] * t.shape[3]
    return torch.arange(n).repeat_interleave(per)


def dphi(r, dist):
    """Derivative of the elementwise distance: 2r (l2) or sign(r) (l1)."""
    return 2 * r if dist == "l2" else torch.sign(r)


def phi(r, dist):
    return r.square() if dist == "l2" else r.abs()


def make_linear(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        d = 6
        f = nn.Linear(d, d, bias=False).double()
        x = torch.randn(5, d, generator=g, dtype=torch.float64)
        z = torch.randn(5, d, generator=g, dtype=torch.float64)
    else:
        d = 3
        f = Conv1x1(d)
        x = torch.randn(4, d, 3, 5, generator=g, dtype=torch.float64)
        z = torch.randn(4, d, 3, 5, generator=g, dtype=torch.float64)
    with torch.no_grad():
        # Away from the identity (where every term vanishes) and from zero.
        f.weight.copy_(torch.eye(d, dtype=torch.float64) + 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64))
    return f, x, z


def closed_form(term, W, x, z, dist, row_weight=None):
    """∇_W of one term (eq. 8 / 10 / reconstruction), W′ = W; optional per-row factor for L_tight."""
    I = torch.eye(W.shape[0], dtype=W.dtype)
    norm = x.numel()  # N * d
    X, Z = rows(x), rows(z)
    if term == "rec":    # D(Wx, x): ∇ = Σ φ'((W−I)x) xᵀ / (N d)
        R = X @ (W - I).T
        return dphi(R, dist).T @ X / norm
    if term == "idem":   # D(W′Wz, Wz), W′ frozen: ∇ = (W′−I)ᵀ Σ φ'((W′−I)Wz) zᵀ / (N d)
        R = Z @ W.T @ (W - I).T
        return (W - I).T @ dphi(R, dist).T @ Z / norm
    if term == "tight":  # −D(Wy, y), y = W′z detached: ∇ = −Σ φ'((W−I)y) yᵀ / (N d)
        Y = Z @ W.T
        G = dphi(Y @ (W - I).T, dist)
        if row_weight is not None:
            G = G * row_weight[:, None]
        return -G.T @ Y / norm
    raise ValueError(term)


def only(term, dist, clamp_ratio=None, clamp_reference="rec"):
    lam = {t: float(t == term) for t in TERMS}
    return LossConfig(lambda_rec=lam["rec"], lambda_idem=lam["idem"], lambda_tight=lam["tight"],
                      distance=dist, clamp_ratio=clamp_ratio, clamp_reference=clamp_reference)


def autograd_grad(f, x, z, cfg):
    f.zero_grad(set_to_none=True)
    out = ign_losses(f, x, z, cfg)
    out["loss"].backward()
    return out, f.weight.grad.clone()


# ---------------------------------------------------------------- 1. gradient semantics
@pytest.mark.parametrize("kind", ["linear", "conv1x1"])
@pytest.mark.parametrize("dist", DISTANCES)
@pytest.mark.parametrize("term", TERMS)
def test_gradient_of_each_term_matches_closed_form(kind, dist, term):
    f, x, z = make_linear(kind)
    W = f.weight.detach().clone()
    out, grad = autograd_grad(f, x, z, only(term, dist))
    expected = closed_form(term, W, x, z, dist)
    assert expected.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dist", DISTANCES)
def test_wrong_gradient_paths_would_be_detected(dist):
    """The closed forms discriminate: the naive gradient of eq. 7 (both instantiations live) and
    the other path alone are both far from what ign_losses produces."""
    f, x, z = make_linear("linear", seed=1)
    W = f.weight.detach().clone()
    _, g_idem = autograd_grad(f, x, z, only("idem", dist))
    _, g_tight = autograd_grad(f, x, z, only("tight", dist))
    # Eq. 13: ∇δ(f(z)) = (outer path) + (inner path); our terms are its two halves with signs.
    Wl = W.clone().requires_grad_(True)
    delta = per_sample_distance(z @ Wl.T @ Wl.T, z @ Wl.T, dist).mean()
    (full,) = torch.autograd.grad(delta, Wl)
    torch.testing.assert_close(g_idem - g_tight, full, rtol=1e-10, atol=1e-12)
    for g in (g_idem, -g_tight):
        assert (g - full).abs().max() > 1e-2 * full.abs().max()


def test_per_sample_distance_values():
    a = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, -1.0]])
    torch.testing.assert_close(per_sample_distance(a, b, "l1"), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(per_sample_distance(a, b, "l2"), torch.tensor([14 / 3, 1.0]))
    # images: mean over C, H, W per sample
    a4 = torch.arange(24.0).view(2, 3, 2, 2)
    torch.testing.assert_close(per_sample_distance(a4, torch.zeros_like(a4), "l1"),
                               a4.flatten(1).mean(1))


# ---------------------------------------------------------------- the smooth clamp (eq. 14)
def clamp_setup(dist, reference, a=1.5, seed=2):
    """A linear f and inputs scaled so that the tanh argument is O(1): neither linear nor saturated."""
    f, x, z = make_linear("linear", seed=seed)
    W = f.weight.detach()
    y = z @ W.T
    t = -per_sample_distance(y @ W.T, y, dist)                  # raw per-sample tightness
    if reference == "rec":
        r = per_sample_distance(x @ W.T, x, dist).mean()
        # scale x so that a·rec equals the mean |t|
        p = 2 if dist == "l2" else 1
        x = x * (t.abs().mean() / (a * r)) ** (1 / p)
    # 'drift': both t and D(f(z), z) are homogeneous of the same degree in z, so their ratio
    # depends on W only; the W of make_linear puts it in range (asserted by the tests).
    return f, x, z


def clamp_reference_value(f, x, z, dist, reference):
    W = f.weight.detach()
    if reference == "rec":
        return per_sample_distance(x @ W.T, x, dist).mean().expand(z.shape[0])
    return per_sample_distance(z @ W.T, z, dist)


@pytest.mark.parametrize("dist", DISTANCES)
@pytest.mark.parametrize("reference", ["rec", "drift"])
def test_clamp_value_and_gradient(dist, reference):
    a = 1.5
    f, x, z = clamp_setup(dist, reference, a)
    W = f.weight.detach().clone()
    cfg = only("tight", dist, clamp_ratio=a, clamp_reference=reference)
    out, grad = autograd_grad(f, x, z, cfg)

    y = z @ W.T
    t = -per_sample_distance(y @ W.T, y, dist)
    s = a * clamp_reference_value(f, x, z, dist, reference)
    u = t / s
    assert (u.abs() > 0.05).all() and (u.abs() < 5).all(), u  # the clamp is in its non-trivial range
    torch.testing.assert_close(out["tight_raw"], t.mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out["tight"], (torch.tanh(u) * s).mean(), rtol=1e-10, atol=0)
    assert out["tight"] > out["tight_raw"]          # tanh(u)·s > u·s for u < 0
    assert (out["tight"] >= -s.max()).all()         # bounded by a·r

    # ∇ = per-sample closed form scaled by 1 − tanh²(t/s); nothing through the reference.
    weight = 1 - torch.tanh(u) ** 2
    expected = closed_form("tight", W, x, z, dist, row_weight=weight[sample_of_row(z)])
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    unscaled = closed_form("tight", W, x, z, dist)
    assert (grad - unscaled).abs().max() > 0.05 * unscaled.abs().max()


@pytest.mark.parametrize("dist", DISTANCES)
@pytest.mark.parametrize("reference", ["rec", "drift"])
def test_no_gradient_through_clamp_reference(dist, reference):
    """If the reference were live, the clamped tightness term would also push on rec (or on the
    drift of z). Build that counterfactual by hand and check it differs from ign_losses."""
    a = 1.5
    f, x, z = clamp_setup(dist, reference, a, seed=3)
    cfg = only("tight", dist, clamp_ratio=a, clamp_reference=reference)
    _, grad = autograd_grad(f, x, z, cfg)

    Wl = f.weight.detach().clone().requires_grad_(True)
    y = (z @ Wl.T).detach()
    t = -per_sample_distance(y @ Wl.T, y, dist)
    ref = (per_sample_distance(x @ Wl.T, x, dist).mean() if reference == "rec"
           else per_sample_distance(z @ Wl.T, z, dist))
    s_live = a * ref
    live = (torch.tanh(t / s_live) * s_live).mean()
    (g_live,) = torch.autograd.grad(live, Wl, retain_graph=True)
    s_det = s_live.detach()
    (g_det,) = torch.autograd.grad((torch.tanh(t / s_det) * s_det).mean(), Wl)

    torch.testing.assert_close(grad, g_det, rtol=1e-10, atol=1e-12)
    assert (g_live - g_det).abs().max() > 0.05 * g_det.abs().max()


def test_clamp_with_full_loss_rec_gradient_is_plain_rec():
    """All three terms on, clamp on: ∇loss = λr∇rec + λi∇idem + λt·(scaled ∇tight), i.e. the rec
    gradient is exactly the closed form with no extra contribution from the clamp reference."""
    a, dist = 1.5, "l1"
    f, x, z = clamp_setup(dist, "rec", a, seed=4)
    W = f.weight.detach().clone()
    cfg = LossConfig(lambda_rec=2.0, lambda_idem=3.0, lambda_tight=0.7, distance=dist, clamp_ratio=a)
    out, grad = autograd_grad(f, x, z, cfg)
    y = z @ W.T
    t = -per_sample_distance(y @ W.T, y, dist)
    s = a * per_sample_distance(x @ W.T, x, dist).mean()
    weight = 1 - torch.tanh(t / s) ** 2
    expected = (2.0 * closed_form("rec", W, x, z, dist) + 3.0 * closed_form("idem", W, x, z, dist)
                + 0.7 * closed_form("tight", W, x, z, dist, row_weight=weight))
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["loss"], 2.0 * out["rec"] + 3.0 * out["idem"] + 0.7 * out["tight"],
                               rtol=1e-12, atol=0)


def test_returned_values_are_detached_but_loss():
    f, x, z = make_linear("linear")
    out = ign_losses(f, x, z, LossConfig(distance="l2"))
    assert set(out) == {"loss", "rec", "idem", "tight", "tight_raw"}
    assert out["loss"].requires_grad
    assert all(not out[k].requires_grad and out[k].dim() == 0 for k in ("rec", "idem", "tight", "tight_raw"))


# ---------------------------------------------------------------- Source Code 1 (DCGAN, BN train mode)
def paper_step_losses(f, f_copy, x, z, cfg):
    """Source Code 1, lines 7-17, generalised only in D, the λs and the clamp (which the listing
    lacks); with distance='l2', λ = 1/1/0.1 and no clamp it is the listing verbatim."""
    f_copy.load_state_dict(f.state_dict())
    fx = f(x)
    fz = f(z)
    f_z = fz.detach()
    ff_z = f(f_z)
    f_fz = f_copy(fz)
    D = (lambda a, b: (a - b).pow(2).mean()) if cfg.distance == "l2" else (lambda a, b: (a - b).abs().mean())
    loss_rec = D(fx, x)
    loss_idem = D(f_fz, fz)
    if cfg.clamp_ratio is None:
        loss_tight = -D(ff_z, f_z)
    else:  # eq. 14 per sample, reference = detached batch rec
        e = ff_z - f_z
        t = -(e.pow(2) if cfg.distance == "l2" else e.abs()).flatten(1).mean(1)
        s = cfg.clamp_ratio * loss_rec.detach()
        loss_tight = (torch.tanh(t / s) * s).mean()
    loss = cfg.lambda_rec * loss_rec + cfg.lambda_idem * loss_idem + cfg.lambda_tight * loss_tight
    return {"loss": loss, "rec": loss_rec, "idem": loss_idem, "tight": loss_tight}


PAPER_CFG = LossConfig(lambda_rec=1.0, lambda_idem=1.0, lambda_tight=0.1, distance="l2", clamp_ratio=None)


def small_dcgan(name, seed=0):
    torch.manual_seed(seed)
    f = build_model(name, width=4 if name == "dcgan64" else 8, latent=16)  # small: CPU test
    f.train()
    c, h, w = f.shape
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.rand(4, c, h, w, generator=g) * 2 - 1
    z = torch.randn(4, c, h, w, generator=g)
    return f, x, z


@pytest.mark.parametrize("name,cfg", [
    ("dcgan28", PAPER_CFG),                                                  # the listing itself
    ("dcgan64", PAPER_CFG),
    ("dcgan64", LossConfig(distance="l1", clamp_ratio=1.5)),                 # Table 1
    ("dcgan28", LossConfig(distance="l2", clamp_ratio=1.0, lambda_tight=5.0)),
], ids=["listing-28", "listing-64", "table1-64", "l2clamp-28"])
def test_matches_source_code_1_with_batchnorm(name, cfg):
    f, x, z = small_dcgan(name)
    ref = copy.deepcopy(f)
    ref_copy = copy.deepcopy(f)  # f_copy: a separate module; its BN statistics are thrown away

    out = ign_losses(f, x, z, cfg)
    out["loss"].backward()
    exp = paper_step_losses(ref, ref_copy, x, z, cfg)
    exp["loss"].backward()

    for k in ("loss", "rec", "idem", "tight"):
        torch.testing.assert_close(out[k].detach(), exp[k].detach(), rtol=1e-5, atol=1e-5, msg=k)
    for (n, p), (_, q) in zip(f.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=n)
    # BN running statistics: updated by f(x), f(z), f(f(z).detach()) only, in that order.
    for (n, b), (_, c) in zip(f.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7, msg=n)
    assert all(int(b) == 3 for n, b in f.named_buffers() if n.endswith("num_batches_tracked"))


def test_train_steps_match_source_code_1():
    """Three Adam steps of train_step equal three iterations of the listing (θ′ ← θ every step)."""
    f, x, z = small_dcgan("dcgan28", seed=5)
    ref = copy.deepcopy(f)
    ref_copy = copy.deepcopy(f)
    # SGD, not Adam: conv biases in front of BN get a gradient that is rounding noise, which Adam
    # would normalise into full-size steps and so compare noise with noise.
    opt = torch.optim.SGD(f.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for step in range(3):
        xs, zs = x + 0.1 * step, z.roll(step, 0)
        out = train_step(f, opt, xs, zs, PAPER_CFG, step)
        exp = paper_step_losses(ref, ref_copy, xs, zs, PAPER_CFG)
        ref_opt.zero_grad()
        exp["loss"].backward()
        ref_opt.step()
        assert out["loss"] == pytest.approx(exp["loss"].item(), rel=1e-5, abs=1e-6)
    for (n, a), b in zip(f.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


# ---------------------------------------------------------------- 2. train_step and the warm-up
def test_train_step_returns_floats_and_updates():
    torch.manual_seed(0)
    f = build_model("mlp2d", hidden=16, depth=2)
    opt = torch.optim.SGD(f.parameters(), lr=0.1)
    x, z = torch.randn(32, 2), torch.randn(32, 2)
    before = [p.detach().clone() for p in f.parameters()]
    cfg = LossConfig()
    expected = {k: v.item() for k, v in ign_losses(copy.deepcopy(f), x, z, cfg, 0).items()}
    out = train_step(f, opt, x, z, cfg, step=0)
    assert set(out) == {"loss", "rec", "idem", "tight", "tight_raw"}
    assert all(type(v) is float for v in out.values())
    assert out == pytest.approx(expected, rel=1e-6)
    assert any(not torch.equal(a, p) for a, p in zip(before, f.parameters()))


@pytest.mark.parametrize("name", ["mlp2d", "dcgan28"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_train_step_non_finite_raises_and_leaves_model_untouched(name, bad):
    torch.manual_seed(0)
    f = build_model(name, **({"hidden": 16, "depth": 2} if name == "mlp2d" else {"width": 8, "latent": 16}))
    shape = f.shape
    opt = torch.optim.Adam(f.parameters(), lr=1e-2)
    x, z = torch.rand(4, *shape) * 2 - 1, torch.randn(4, *shape)
    train_step(f, opt, x, z, LossConfig(), step=0)            # a real step: optimizer has state
    state = copy.deepcopy(f.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    grads = [p.grad.clone() for p in f.parameters()]
    x_bad = x.clone()
    x_bad[0, 0] = bad
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1"):
        train_step(f, opt, x_bad, z, LossConfig(), step=1)
    for (n, a), b in zip(f.state_dict().items(), state.values()):
        assert torch.equal(a, b), n                        # weights and BN statistics
    for g, p in zip(grads, f.parameters()):
        assert torch.equal(g, p.grad)                      # no zero_grad / backward either
    assert opt.state_dict()["state"][0]["step"] == opt_state["state"][0]["step"]


def test_lambda_tight_warmup_is_linear_and_pure():
    cfg = LossConfig(lambda_tight=2.5, tight_warmup=100)
    steps = [0, 1, 25, 50, 99, 100, 101, 1000]
    expected = [0.0, 0.025, 0.625, 1.25, 2.475, 2.5, 2.5, 2.5]
    assert [lambda_tight_at(cfg, s) for s in steps] == pytest.approx(expected, rel=1e-12, abs=0)
    # pure: the same answers in any order, repeatedly, and cfg untouched
    assert [lambda_tight_at(cfg, s) for s in reversed(steps)] == pytest.approx(expected[::-1])
    assert lambda_tight_at(cfg, 50) == lambda_tight_at(cfg, 50)
    assert cfg.lambda_tight == 2.5 and cfg.tight_warmup == 100
    assert lambda_tight_at(cfg, None) == 2.5
    assert lambda_tight_at(LossConfig(lambda_tight=2.5), 0) == 2.5  # no warm-up


def test_warmup_enters_the_loss():
    f, x, z = make_linear("linear")
    cfg = LossConfig(lambda_rec=1.0, lambda_idem=2.0, lambda_tight=4.0, tight_warmup=10, distance="l2",
                     clamp_ratio=None)
    for step in (0, 3, 10, 20):
        out = ign_losses(f, x, z, cfg, step)
        lt = 4.0 * min(1.0, step / 10)
        torch.testing.assert_close(out["loss"].detach(), out["rec"] + 2.0 * out["idem"] + lt * out["tight"],
                                   rtol=1e-12, atol=1e-12)


def test_loss_config_validation():
    with pytest.raises(ValueError, match="clamp_ratio"):
        LossConfig(clamp_ratio=0.5)          # a >= 1 (eq. 14)
    with pytest.raises(ValueError, match="distance"):
        LossConfig(distance="l3")
    with pytest.raises(ValueError, match="lambda_rec"):
        LossConfig(lambda_rec=-1)
    with pytest.raises(ValueError, match="nope"):
        LossConfig(nope=1)
