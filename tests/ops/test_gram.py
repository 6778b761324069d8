"""mtvision.ops.gram_matrix / weighted_sum against their float64 references."""

import pytest
import torch

from mtvision.ops import gram_matrix, reference, weighted_sum

CUDA = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "mtvision::gram_matrix", "CUDA")
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def chunks(T, shapes, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, *s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]


SHAPES = [(3, 3, 8, 8), (8,), (), (70001,), (5, 300)]  # conv weight, bias, scalar, long, odd


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 2, 3, 7, 10, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_matches_reference(device, T, dtype):
    for seed in range(2):
        grads = chunks(T, SHAPES, dtype, device, seed)
        got = gram_matrix(grads)
        assert got.shape == (T, T) and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        ref = reference.gram_matrix(grads)
        scale = ref.diagonal().max()
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert ((got.double() - ref).abs().max() / scale).item() < tol
        assert torch.equal(got, got.T)


@pytest.mark.parametrize("device", DEVICES)
def test_flat_and_chunked_agree(device):
    grads = chunks(4, SHAPES, torch.float64, device)
    flat = torch.cat([g.reshape(4, -1) for g in grads], dim=1)
    torch.testing.assert_close(gram_matrix(flat), gram_matrix(grads), rtol=1e-12, atol=1e-9)
    w = torch.randn(4, dtype=torch.float64, device=device)
    summed = torch.cat([s.reshape(-1) for s in weighted_sum(grads, w)])
    torch.testing.assert_close(weighted_sum(flat, w), summed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_weighted_sum_matches_reference(device, dtype):
    grads = chunks(5, SHAPES, dtype, device, seed=3)
    w = torch.randn(5, device=device)
    got = weighted_sum(grads, w)
    ref = reference.weighted_sum(grads, w)
    for a, b, g in zip(got, ref, grads):
        assert a.shape == g.shape[1:] and a.dtype == g.dtype
        tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_weighted_sum_into_given_tensors(device):
    grads = chunks(4, SHAPES, torch.float32, device, seed=5)
    w = torch.randn(4, device=device)
    outs = [torch.full(g.shape[1:], float("nan"), device=device) for g in grads]  # every element written
    returned = weighted_sum(grads, w, out=outs)
    assert all(a is b for a, b in zip(returned, outs))
    for a, b in zip(outs, weighted_sum(grads, w)):
        assert torch.equal(a, b)
    flat = torch.cat([g.reshape(4, -1) for g in grads], dim=1)
    out = torch.empty(flat.shape[1], device=device)
    assert weighted_sum(flat, w, out=out) is out
    with pytest.raises(RuntimeError, match="output 0 must be a contiguous"):
        weighted_sum(grads, w, out=[torch.empty(3, device=device)] + outs[1:])


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_gram_accumulates_in_float32(device):
    grads = chunks(3, [(200000,)], torch.bfloat16, device)
    got = gram_matrix(grads)
    assert got.dtype == torch.float32
    ref = reference.gram_matrix(grads)  # of the same bfloat16 values, in float64
    assert ((got.double() - ref).abs().max() / ref.diagonal().max()).item() < 1e-5


def test_deterministic_across_thread_counts():
    grads = chunks(6, [(300000,), (1000,)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = gram_matrix(grads)
        torch.set_num_threads(max(2, threads))
        b = gram_matrix(grads)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)


def test_zero_and_duplicate_gradients():
    g = torch.randn(1, 1000, dtype=torch.float64)
    grads = torch.cat([g, g, torch.zeros_like(g)])
    G = gram_matrix(grads)
    assert G[2].abs().max() == 0 and G[:, 2].abs().max() == 0
    torch.testing.assert_close(G[0, 1], G[0, 0])


def test_gradcheck():
    grads = [t.requires_grad_() for t in chunks(3, [(4, 2), (5,)], torch.float64)]
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: gram_matrix([a, b]), grads)
    assert torch.autograd.gradcheck(lambda a, b, w: tuple(weighted_sum([a, b], w)), (*grads, w))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    grads = chunks(3, [(4, 2), (5,), ()], torch.float32, device)
    torch.library.opcheck(torch.ops.mtvision.gram_matrix.default, (grads,))
    torch.library.opcheck(torch.ops.mtvision.weighted_sum.default, (grads, torch.randn(3, device=device)))
    outs = [torch.empty(g.shape[1:], device=device) for g in grads]
    torch.library.opcheck(torch.ops.mtvision.weighted_sum_out.default, (grads, torch.randn(3, device=device), outs))


def test_torch_compile_fullgraph():
    grads = chunks(3, [(4, 2), (50,)])
    w = torch.randn(3)

    def fn(a, b, w):
        G = gram_matrix([a, b])
        return G, weighted_sum([a, b], w / G.diagonal().sqrt())

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    G1, s1 = fn(*grads, w)
    G2, s2 = compiled(*grads, w)
    torch.testing.assert_close(G1, G2)
    for x, y in zip(s1, s2):
        torch.testing.assert_close(x, y)


def test_bad_inputs():
    with pytest.raises(ValueError, match="no gradients"):
        gram_matrix([])
    with pytest.raises(ValueError, match="no gradients"):
        weighted_sum([], torch.ones(3))
    with pytest.raises(RuntimeError, match=r"chunk 1 has shape"):
        gram_matrix([torch.randn(3, 4), torch.randn(2, 4)])
    with pytest.raises(RuntimeError, match=r"weights must be \[3\]"):
        weighted_sum([torch.randn(3, 4)], torch.randn(2))
