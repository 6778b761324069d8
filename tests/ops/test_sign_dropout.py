"""mtvision.ops.sign_dropout_sum (GradDrop's combination) against its float64 per-task reference."""

import pytest
import torch

from mtvision.ops import reference, sign_dropout_sum

CUDA = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "mtvision::sign_dropout_sum_out", "CUDA")
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
SHAPES = [(3, 3, 8, 8), (8,), (), (70001,), (5, 300)]  # conv weight, bias, scalar, long (two items), odd


def chunks(T, dtype=torch.float64, device="cpu", seed=0, kind="random"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in SHAPES:
        x = torch.randn(T, *s, generator=g, dtype=torch.float64)
        if kind == "zeros":
            x.zero_()
        elif kind == "one_sign":
            x = x.abs()
        elif kind == "sparse":  # exact zeros among the values, and whole zero coordinates
            x = torch.where(torch.rand(x.shape, generator=g, dtype=torch.float64) < 0.4, 0.0, x)
        out.append(x.to(device, dtype))
    return out


def draws_for(grads, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(c.shape[1:], generator=g).to(c.device) for c in grads]


def purity64(c):
    g = c.double()
    mass = g.abs().sum(0)
    return torch.where(mass > 0, 0.5 * (1 + g.sum(0) / torch.where(mass > 0, mass, 1.0)), 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 2, 3, 10, 17])
@pytest.mark.parametrize("kind", ["random", "zeros", "one_sign", "sparse"])
@pytest.mark.parametrize("leak", [0.0, 0.3, 1.0])
def test_float64_matches_reference(device, T, kind, leak):
    grads = chunks(T, torch.float64, device, kind=kind)
    u = draws_for(grads)
    got = sign_dropout_sum(grads, u, leak)
    ref = reference.sign_dropout_sum(grads, u, leak)
    for a, b, c in zip(got, ref, grads):
        assert a.shape == c.shape[1:] and a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_matches_reference_away_from_ties(device, dtype):
    """Accumulated in float32: the same mask as the float64 reference wherever P is not within float32
    rounding of its draw, and values within the dtype's rounding."""
    grads = chunks(5, dtype, device, kind="sparse")
    u = draws_for(grads)
    got = sign_dropout_sum(grads, u, 0.0)
    ref = reference.sign_dropout_sum([c.double() for c in grads], u, 0.0)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for a, b, c, draw in zip(got, ref, grads, u):
        assert a.dtype == dtype
        clear = (purity64(c) - draw.double()).abs() > 1e-5
        scale = c.double().abs().sum(0)
        assert ((a.double() - b).abs() <= tol * scale + 1e-30)[clear].all()


@pytest.mark.parametrize("device", DEVICES)
def test_out_flat_and_promised_properties(device):
    grads = chunks(4, torch.float64, device)
    u = draws_for(grads)
    outs = [torch.full(c.shape[1:], float("nan"), dtype=c.dtype, device=device) for c in grads]
    assert sign_dropout_sum(grads, u, 0.0, out=outs) is outs
    for a, b in zip(outs, sign_dropout_sum(grads, u, 0.0)):
        assert torch.equal(a, b)
    flat = torch.cat([c.reshape(4, -1) for c in grads], dim=1)
    flat_u = torch.cat([x.reshape(-1) for x in u])
    joined = torch.cat([o.reshape(-1) for o in outs])
    assert torch.equal(sign_dropout_sum(flat, flat_u), joined)  # coordinates are independent
    # leak 1: the plain sum; one sign everywhere: everything kept, whatever the draws
    for a, c in zip(sign_dropout_sum(grads, u, 1.0), grads):
        torch.testing.assert_close(a, c.sum(0), rtol=1e-12, atol=1e-12)
    pos = [c.abs() for c in grads]
    for a, c in zip(sign_dropout_sum(pos, u), pos):
        torch.testing.assert_close(a, c.sum(0), rtol=1e-12, atol=1e-12)
    # the draws decide: u = 0 keeps the positive sum wherever P > 0, u = 1 the negative one where P < 1
    zeros = [torch.zeros_like(x) for x in u]
    for a, c in zip(sign_dropout_sum(grads, zeros), grads):
        p = purity64(c)
        torch.testing.assert_close(a, torch.where(p > 0, c.clamp_min(0).sum(0), 0.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_refused_with_the_field(device):
    grads = chunks(3, torch.float32, device)
    u = draws_for(grads)
    with pytest.raises(RuntimeError, match="draw tensors for"):
        sign_dropout_sum(grads, u[:-1])
    with pytest.raises(RuntimeError, match="draws 1 must be a contiguous float32 tensor of 8 elements"):
        sign_dropout_sum(grads, [u[0], u[1].double(), *u[2:]])
    with pytest.raises(RuntimeError, match="draws 0 must be"):
        sign_dropout_sum(grads, [torch.rand(5, device=device), *u[1:]])
    with pytest.raises(RuntimeError, match="leak must be in"):
        sign_dropout_sum(grads, u, 1.5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    grads = chunks(3, torch.float32, device)[:3]
    u = draws_for(grads)
    outs = [torch.empty(c.shape[1:], device=device) for c in grads]
    torch.library.opcheck(torch.ops.mtvision.sign_dropout_sum_out.default, (grads, u, 0.2, outs))
