"""mtvision.ops.fused_dense_loss against its float64 reference (mtvision.ops.reference)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from mtvision.ops import fused_dense_loss, reference

CUDA = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "mtvision::fused_dense_loss_forward", "CUDA")
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a GPU and the CUDA kernels")


F64_TOL = dict(atol=1e-12, rtol=1e-10, grad_atol=1e-14, grad_rtol=1e-10)


def make_inputs(B=2, C=5, H=6, W=7, dtype=torch.float64, device="cpu", ignore=0.2, invalid=0.25,
                scale=3.0, seed=0):
    """Random predictions/targets with ignored labels and invalid depth/normal pixels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < ignore] = 255
    depth = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64) * 5 + 0.1
    depth_t = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64) * 5 + 0.1
    depth_t[torch.rand(B, 1, H, W, generator=g) < invalid] = 0
    normal = torch.randn(B, 3, H, W, generator=g, dtype=torch.float64)
    normal_t = F.normalize(torch.randn(B, 3, H, W, generator=g, dtype=torch.float64), dim=1)
    normal_t[(torch.rand(B, 1, H, W, generator=g) < invalid).expand(-1, 3, -1, -1)] = 0
    out = [logits, labels, depth, depth_t, normal, normal_t]
    return [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in out]


def with_grad(inputs):
    return [t.clone().requires_grad_() if i in (0, 2, 4) and t is not None else t
            for i, t in enumerate(inputs)]


def losses_and_grads(fn, inputs, weights):
    inputs = with_grad(inputs)
    losses = fn(*inputs)
    preds = [inputs[i] for i in (0, 2, 4) if inputs[i] is not None]
    grads = torch.autograd.grad((losses.double() * weights.to(losses.device)).sum(), preds)
    return losses, grads


def assert_matches_reference(inputs, atol=1e-6, rtol=1e-5, grad_atol=1e-7, grad_rtol=1e-5):
    """The op on `inputs` equals the float64 reference on the same values (upcast)."""
    weights = torch.tensor([0.7, 1.3, -0.4], dtype=torch.float64)
    ref_inputs = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    out, grads = losses_and_grads(fused_dense_loss, inputs, weights)
    ref, ref_grads = losses_and_grads(reference.fused_dense_loss, ref_inputs, weights)
    pred_dtypes = {t.dtype for t in (inputs[0], inputs[2], inputs[4]) if t is not None}
    assert out.dtype == (torch.float64 if torch.float64 in pred_dtypes else torch.float32)
    assert out.shape == (3,)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), atol=atol, rtol=rtol)
    for g, r, pred in zip(grads, ref_grads, [t for t in (inputs[0], inputs[2], inputs[4]) if t is not None]):
        assert g.shape == pred.shape
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double().cpu(), r.cpu(), atol=grad_atol, rtol=grad_rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [2, 13, 19, 150])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(device, C, dtype):
    for seed in range(3):  # fresh random inputs each time
        inputs = make_inputs(B=2, C=C, H=9, W=11, dtype=dtype, device=device, seed=seed * 100 + C)
        tol = F64_TOL if dtype == torch.float64 else {}
        assert_matches_reference(inputs, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_larger_than_one_block(device):
    # more pixels than one CPU block (256) and than one CUDA block per thread, odd sizes
    assert_matches_reference(make_inputs(B=3, C=7, H=33, W=45, dtype=torch.float32, device=device, seed=5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("present", [p for p in itertools.product([True, False], repeat=3) if any(p)])
def test_any_task_may_be_none(device, present):
    inputs = make_inputs(device=device)
    for task, keep in enumerate(present):
        if not keep:
            inputs[2 * task] = inputs[2 * task + 1] = None
    out = fused_dense_loss(*inputs)
    for task, keep in enumerate(present):
        if not keep:
            assert out[task].item() == 0.0
    assert_matches_reference(inputs, **F64_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_all_invalid_gives_zero_loss_and_zero_grad(device):
    inputs = make_inputs(device=device)
    inputs[1].fill_(255)
    inputs[3].zero_()
    inputs[5].zero_()
    inputs = with_grad(inputs)
    out = fused_dense_loss(*inputs)
    assert torch.equal(out.cpu(), torch.zeros(3))
    out.sum().backward()
    for i in (0, 2, 4):
        assert torch.isfinite(inputs[i].grad).all()
        assert (inputs[i].grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_one_task_all_invalid_others_unaffected(device):
    inputs = make_inputs(device=device, dtype=torch.float32)
    inputs[3].zero_()
    assert_matches_reference(inputs)
    assert fused_dense_loss(*inputs)[1].item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits(device):
    inputs = make_inputs(C=13, dtype=torch.float32, device=device, seed=3)
    sign = torch.where(torch.rand_like(inputs[0]) < 0.5, -1.0, 1.0)
    inputs[0] = sign * 1e4
    # float32 holds 1e4 + log(k) to ~5e-4, so softmax of float32 logits this large is only that exact
    # (torch's own float32 log_softmax too); what matters is finite, close values.
    assert_matches_reference(inputs, atol=1e-2, rtol=1e-6, grad_atol=1e-5, grad_rtol=1e-3)
    assert_matches_reference([t.double() if t.is_floating_point() else t for t in inputs], **F64_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_channels_last(device):
    base = make_inputs(B=2, C=6, H=10, W=14, dtype=torch.float32, device=device, seed=7)
    # strided views: every other column of a wider tensor
    wide = [None if t is None else torch.cat([t, t], dim=-1)[..., ::2] for t in base]
    assert not wide[0].is_contiguous()
    assert_matches_reference(wide)
    cl = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in base]
    assert cl[0].is_contiguous(memory_format=torch.channels_last) and not cl[0].is_contiguous()
    assert_matches_reference(cl)
    # channels_last gradients come back in the input's layout and equal the contiguous ones
    _, g_cl = losses_and_grads(fused_dense_loss, cl, torch.ones(3, dtype=torch.float64))
    _, g = losses_and_grads(fused_dense_loss, base, torch.ones(3, dtype=torch.float64))
    for a, b in zip(g_cl, g):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # permuted (neither NCHW nor NHWC contiguous)
    perm = [None if t is None else t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in base]
    assert_matches_reference(perm)


@pytest.mark.parametrize("device", DEVICES)
def test_per_task_backward_reuses_forward(device):
    """Backward of one task at a time (retain_graph) sums to the joint backward."""
    inputs = with_grad(make_inputs(device=device))
    out = fused_dense_loss(*inputs)
    preds = [inputs[i] for i in (0, 2, 4)]
    per_task = [torch.autograd.grad(out[t], preds, retain_graph=True, allow_unused=True) for t in range(3)]
    joint = torch.autograd.grad(out.sum(), preds)
    for k in range(3):
        total = sum(per_task[t][k] for t in range(3) if per_task[t][k] is not None)
        torch.testing.assert_close(total, joint[k], atol=1e-14, rtol=1e-12)
    # the seg loss alone has no gradient on the depth prediction
    assert per_task[0][1] is None or (per_task[0][1] == 0).all()


def test_deterministic_across_thread_counts():
    inputs = make_inputs(B=2, C=9, H=40, W=50, dtype=torch.float32, seed=11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, ga = losses_and_grads(fused_dense_loss, inputs, torch.ones(3, dtype=torch.float64))
        torch.set_num_threads(max(2, threads))
        b, gb = losses_and_grads(fused_dense_loss, inputs, torch.ones(3, dtype=torch.float64))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)


def test_gradcheck():
    inputs = with_grad(make_inputs(B=1, C=4, H=3, W=5, seed=2))

    def fn(seg, depth, normal):
        return fused_dense_loss(seg, inputs[1], depth, inputs[3], normal, inputs[5])

    assert torch.autograd.gradcheck(fn, (inputs[0], inputs[2], inputs[4]))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for present in [(True, True, True), (True, False, False), (False, True, True)]:
        inputs = with_grad(make_inputs(B=2, C=4, H=5, W=6, dtype=torch.float32, device=device))
        for task, keep in enumerate(present):
            if not keep:
                inputs[2 * task] = inputs[2 * task + 1] = None
        torch.library.opcheck(torch.ops.mtvision.fused_dense_loss_forward.default, (*inputs, 255))
        out = torch.ops.mtvision.fused_dense_loss_forward(*inputs, 255)
        detached = [t.detach() if t is not None else None for t in inputs]
        torch.library.opcheck(torch.ops.mtvision.fused_dense_loss_backward.default,
                              (torch.randn(3, device=device), out[1], out[2].detach(), *detached, 255))


def test_torch_compile_fullgraph():
    inputs = with_grad(make_inputs(B=2, C=5, H=8, W=8, dtype=torch.float32, seed=4))

    def step(seg, seg_t, depth, depth_t, normal, normal_t):
        losses = fused_dense_loss(seg, seg_t, depth, depth_t, normal, normal_t)
        return losses, (losses * torch.tensor([1.0, 2.0, 0.5])).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_losses, eager_total = step(*inputs)
    eager_grads = torch.autograd.grad(eager_total, [inputs[0], inputs[2], inputs[4]])
    comp_losses, comp_total = compiled(*inputs)
    comp_grads = torch.autograd.grad(comp_total, [inputs[0], inputs[2], inputs[4]])
    torch.testing.assert_close(comp_losses, eager_losses)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_bad_inputs_fail_with_clear_messages():
    inputs = make_inputs(C=4)
    bad = list(inputs)
    bad[1] = bad[1].clone()
    bad[1][0, 0, 0] = 7
    with pytest.raises(RuntimeError, match="label 7 outside"):
        fused_dense_loss(*bad)
    with pytest.raises(RuntimeError, match="seg_target must be"):
        fused_dense_loss(inputs[0], inputs[1][:, :-1], *inputs[2:])
    with pytest.raises(RuntimeError, match="normal_pred must have 3 channels"):
        fused_dense_loss(*inputs[:4], inputs[4][:, :2], inputs[5][:, :2])
    with pytest.raises(ValueError, match="given together"):
        fused_dense_loss(inputs[0], None, *inputs[2:])
    with pytest.raises(ValueError, match="at least one task"):
        fused_dense_loss(None, None, None, None, None, None)


def test_half_precision_on_cpu_is_computed_in_float32():
    inputs = make_inputs(dtype=torch.bfloat16)
    out = fused_dense_loss(*inputs)
    assert out.dtype == torch.float32
    ref = reference.fused_dense_loss(*[t.double() if t.is_floating_point() else t for t in inputs])
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    _, grads = losses_and_grads(fused_dense_loss, inputs, torch.ones(3, dtype=torch.float64))
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3


def test_mixed_dtypes_are_promoted():
    inputs = make_inputs(dtype=torch.float32)
    inputs[2] = inputs[2].double()
    assert_matches_reference(inputs)


@cuda_only
@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_cuda_half_precision_against_float64(dtype, atol):
    for seed in range(3):
        inputs = make_inputs(B=2, C=19, H=24, W=40, dtype=dtype, device="cuda", seed=seed)
        ref_inputs = [t.double() if t.is_floating_point() else t for t in inputs]
        out = fused_dense_loss(*inputs)
        assert out.dtype == torch.float32
        ref = reference.fused_dense_loss(*ref_inputs)
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=1e-2)
        _, grads = losses_and_grads(fused_dense_loss, inputs, torch.ones(3, dtype=torch.float64))
        _, ref_grads = losses_and_grads(reference.fused_dense_loss, ref_inputs, torch.ones(3, dtype=torch.float64))
        for g, r in zip(grads, ref_grads):
            assert g.dtype == dtype
            err = (g.double() - r).norm() / r.norm()
            assert err < 1e-2, err


@cuda_only
def test_cuda_matches_cpu_and_is_deterministic():
    inputs = make_inputs(B=4, C=21, H=64, W=80, dtype=torch.float32, seed=9)
    cpu = fused_dense_loss(*inputs)
    gpu_inputs = [t.cuda() for t in inputs]
    a = fused_dense_loss(*gpu_inputs)
    b = fused_dense_loss(*gpu_inputs)
    assert torch.equal(a, b)
    torch.testing.assert_close(a.cpu(), cpu, atol=1e-5, rtol=1e-5)
