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


SEED = 123456789012345


def draws_for(grads, seed=SEED):
    """The op's draws per chunk, from the reference's counter-based generator."""
    u = reference.counter_uniform(seed, sum(c[0].numel() for c in grads))
    sizes = [c[0].numel() for c in grads]
    return [v.view(c.shape[1:]).to(c.device) for v, c in zip(torch.split(u, sizes), grads)]


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
    got = sign_dropout_sum(grads, SEED, leak)
    ref = reference.sign_dropout_sum(grads, SEED, leak)
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
    got = sign_dropout_sum(grads, SEED, 0.0)
    ref = reference.sign_dropout_sum([c.double() for c in grads], SEED, 0.0)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for a, b, c, draw in zip(got, ref, grads, u):
        assert a.dtype == dtype
        clear = (purity64(c) - draw.double()).abs() > 1e-5
        scale = c.double().abs().sum(0)
        assert ((a.double() - b).abs() <= tol * scale + 1e-30)[clear].all()


@pytest.mark.parametrize("device", DEVICES)
def test_out_flat_and_promised_properties(device):
    grads = chunks(4, torch.float64, device)
    outs = [torch.full(c.shape[1:], float("nan"), dtype=c.dtype, device=device) for c in grads]
    assert sign_dropout_sum(grads, SEED, 0.0, out=outs) is outs
    for a, b in zip(outs, sign_dropout_sum(grads, SEED, 0.0)):
        assert torch.equal(a, b)
    flat = torch.cat([c.reshape(4, -1) for c in grads], dim=1)
    joined = torch.cat([o.reshape(-1) for o in outs])
    assert torch.equal(sign_dropout_sum(flat, SEED), joined)  # coordinates counted over the chunks in order
    assert not torch.equal(sign_dropout_sum(flat, SEED + 1), joined)  # another seed, other draws
    # leak 1: the plain sum; one sign everywhere: everything kept, whatever the draws
    for a, c in zip(sign_dropout_sum(grads, SEED, 1.0), grads):
        torch.testing.assert_close(a, c.sum(0), rtol=1e-12, atol=1e-12)
    pos = [c.abs() for c in grads]
    for a, c in zip(sign_dropout_sum(pos, SEED), pos):
        torch.testing.assert_close(a, c.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_positive_sign_kept_with_probability_p(device):
    """Two tasks +0.3 and -0.7 at every coordinate: P = 0.3, so the positive value is kept at about 30 %
    of 200 000 coordinates, and exactly where the reference's draw is below P."""
    n = 200_000
    g = torch.tensor([0.3, -0.7], dtype=torch.float64, device=device)[:, None].expand(2, n).contiguous()
    out = sign_dropout_sum(g, SEED)
    kept_pos = out > 0
    assert abs(kept_pos.double().mean().item() - 0.3) < 0.005
    u = reference.counter_uniform(SEED, n).double().to(device)
    p = torch.tensor(0.3, dtype=torch.float64)
    assert torch.equal(kept_pos, u < p)


def test_counter_uniform_draws():
    u = reference.counter_uniform(SEED, 100_000)
    assert u.dtype == torch.float32 and (u >= 0).all() and (u < 1).all()
    assert abs(u.double().mean().item() - 0.5) < 0.005 and abs(u.double().var().item() - 1 / 12) < 0.002
    assert torch.equal(reference.counter_uniform(SEED, 10, first=5), u[5:15])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_refused_with_the_field(device):
    grads = chunks(3, torch.float32, device)
    with pytest.raises(RuntimeError, match="leak must be in"):
        sign_dropout_sum(grads, SEED, 1.5)
    with pytest.raises(RuntimeError, match="sign_dropout_sum: output 1 must be a contiguous"):
        sign_dropout_sum(grads, SEED, out=[torch.empty(c.shape[1:], device=device) if i != 1 else
                                          torch.empty(3, device=device) for i, c in enumerate(grads)])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    grads = chunks(3, torch.float32, device)[:3]
    outs = [torch.empty(c.shape[1:], device=device) for c in grads]
    torch.library.opcheck(torch.ops.mtvision.sign_dropout_sum_out.default, (grads, SEED, 0.2, outs))
