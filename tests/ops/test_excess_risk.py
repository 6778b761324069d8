"""mtvision.ops.excess_risk_step (ExcessMTL's AdaGrad step in one pass) against its float64 reference."""

import pytest
import torch

from mtvision.ops import excess_risk_step, reference

CUDA = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "mtvision::excess_risk_step", "CUDA")
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
SHAPES = [(3, 3, 8, 8), (8,), (), (70001,), (5, 300)]  # conv weight, bias, scalar, long (two items), odd


def chunks(T, dtype=torch.float64, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(T, *s, generator=g, dtype=torch.float64) * scale).to(device, dtype) for s in SHAPES]


def accumulators(grads, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(c.shape, generator=g, dtype=torch.float64).to(c.device, c.dtype) for c in grads]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 2, 3, 10])
def test_float64_matches_reference_over_steps(device, T):
    """Three steps from a zero accumulator (the first step's ratio is |g| per coordinate) and from a
    random one: the sums and the accumulator equal the reference's."""
    for start in ("zeros", "random"):
        grads0 = chunks(T, device=device)
        acc = [torch.zeros_like(c) for c in grads0] if start == "zeros" else accumulators(grads0)
        acc_ref = [a.clone() for a in acc]
        for step in range(3):
            grads = chunks(T, device=device, seed=step)
            got = excess_risk_step(grads, acc, 1e-7)
            want = reference.excess_risk_step(grads, acc_ref, 1e-7)
            assert got.shape == (T,) and got.dtype == torch.float64
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
            for a, b in zip(acc, acc_ref):
                torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


def test_first_step_from_zero_is_the_l1_norm():
    """A = g² after the first step, so g²/sqrt(A) = |g|: the sums are the rows' L1 norms (eps = 0)."""
    grads = chunks(3)
    acc = [torch.zeros_like(c) for c in grads]
    got = excess_risk_step(grads, acc, 0.0)
    want = sum(c.abs().reshape(3, -1).sum(1) for c in grads)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_low_precision_against_reference(device, dtype, rtol):
    grads = chunks(3, dtype, device)
    acc = accumulators(grads)
    acc_ref = [a.clone() for a in acc]
    got = excess_risk_step(grads, acc, 1e-7)
    want = reference.excess_risk_step(grads, acc_ref, 1e-7)
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    for a, b in zip(acc, acc_ref):  # each stored A is one rounding of A + g² (in float vs in float64)
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=0)


def test_norms_far_apart_and_zero_gradients():
    """Tasks whose gradients are 1e-4 and 1e4 in size and one all zero: the first step's ratio is |g|, so
    the sums scale with the gradients, and a zero task sums to 0."""
    small, big = chunks(1, scale=1e-4), chunks(1, scale=1e4, seed=0)
    grads = [torch.cat([s, b, torch.zeros_like(s)]) for s, b in zip(small, big)]
    acc = [torch.zeros_like(c) for c in grads]
    got = excess_risk_step(grads, acc, 1e-30)  # eps keeps 0 / sqrt(0) out, far below the 1e-8 of g² here
    l1 = sum(c[0].abs().sum() for c in chunks(1))
    torch.testing.assert_close(got, torch.stack([l1 * 1e-4, l1 * 1e4, torch.zeros((), dtype=torch.float64)]),
                               rtol=1e-12, atol=0)


def test_bad_accumulator_is_named():
    grads = chunks(2, torch.float32)
    acc = [torch.zeros_like(c) for c in grads]
    with pytest.raises(RuntimeError, match="excess_risk_step: 4 accumulators for 5 gradient chunks"):
        excess_risk_step(grads, acc[:4])
    acc[1] = torch.zeros_like(grads[1], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="excess_risk_step: accumulator 1 must be a contiguous Float"):
        excess_risk_step(grads, acc)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    grads = chunks(3, torch.float32, device)[:3]
    acc = [torch.zeros_like(c) for c in grads]
    torch.library.opcheck(torch.ops.mtvision.excess_risk_step.default, (grads, acc, 1e-7))
