"""Speed of mtvision's custom ops against their eager PyTorch baselines, measured in the same run.

    python tools/benchmark.py [--device cpu|cuda|all] [--repeats 15] [--json FILE]
                              [--only loss|aggregation|solve|step|monitor|switches|data|inference|arch]

Each row: median wall time of forward+backward over `--repeats` runs after warm-up, the ratio
eager/fused, and the peak extra memory of one forward+backward (CPU: peak RSS growth, measured in a
fresh subprocess per variant; CUDA: torch.cuda.max_memory_allocated growth). On CUDA the floor is the
bytes the op must move divided by the device-to-device copy bandwidth measured in the same run.
The step rows time one training step of the synthetic 3-task model per balancing method against EW
and against the passes the method needs (interleaved rounds, median of per-round ratios), and count
the operator calls each makes (``step_ops``, ``floor_ops``: the host work a launch-bound GPU step
waits for); a second setup shrinks the model and images until the host's work per operator call is
what a step costs, as on a GPU bound by kernel launches, so that regime is measurable on any machine.
The solve rows time each gradient method's T x T solve on the host.
The monitor rows time EW training with the task-relation monitor (and the lookahead affinity) every 10
steps against plain EW, over blocks of 10 steps.
The switch rows time one training step per precision / memory-format / compile setting as a ratio to
fp32. The data rows time NYUv2-size samples per second through the dataset path in one process (one worker).
The inference rows time the synthetic 3-task ResNet-18 model's forward pass (no gradient) at the NYUv2
and Cityscapes input sizes, batch 1 and 8, in PyTorch eager, torch.compile'd (its compilation time in
`compile_s`) and exported to ONNX and run with onnxruntime (every execution provider of `--device` that
the installed onnxruntime has: CPU; CUDA and TensorRT on a GPU): images per second and the latency
percentiles of one batch.
The arch rows build the demo model as each multi-task architecture (``model.arch``): its parameters, its
forward FLOPs per image at the demo size, and one EW training step as a ratio to hard sharing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mtvision.ops import fused_dense_loss, gram_matrix, reference, weighted_sum

# (name, B, C, H, W): the LibMTL NYUv2 and Cityscapes training shapes
LOSS_SHAPES = [("nyuv2", 8, 13, 288, 384), ("cityscapes", 8, 19, 256, 512)]


def loss_inputs(B, C, H, W, device, dtype=torch.float32, seed=0):
    """Random dense-task predictions (requiring grad) and targets with ignored/invalid pixels."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.randn(B, C, H, W, generator=g) * 2
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < 0.1] = 255
    depth = torch.rand(B, 1, H, W, generator=g) * 10
    depth_t = torch.rand(B, 1, H, W, generator=g) * 10
    depth_t[depth_t < 1] = 0
    normal = torch.randn(B, 3, H, W, generator=g)
    normal_t = F.normalize(torch.randn(B, 3, H, W, generator=g), dim=1)
    preds = [t.to(device, dtype).requires_grad_() for t in (seg, depth, normal)]
    targets = [labels.to(device), depth_t.to(device, dtype), normal_t.to(device, dtype)]
    return preds, targets


def loss_step(fn, preds, targets):
    losses = fn(preds[0], targets[0], preds[1], targets[1], preds[2], targets[2])
    return torch.autograd.grad(losses.sum(), preds)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(step, device, repeats, warmup=3):
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_extra_memory(variant, shape):
    """Peak RSS growth of one forward+backward, in a fresh interpreter so peaks don't mix."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory-probe", variant,
                          *map(str, shape)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def memory_probe(variant, B, C, H, W):
    preds, targets = loss_inputs(B, C, H, W, "cpu")
    fn = fused_dense_loss if variant == "fused" else reference.fused_dense_loss
    loss_step(fn, *loss_inputs(1, C, 8, 8, "cpu"))  # first-call allocations (kernels, caches)
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
        f.write("5")
    before = _status_bytes("VmRSS")
    grads = loss_step(fn, preds, targets)
    print(max(0, _status_bytes("VmHWM") - before))
    del grads


def copy_bandwidth(device):
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device, repeats=20)
    return 2 * src.numel() / seconds


def cuda_graph_time(step, repeats=50):
    """GPU time of `step` replayed from a CUDA graph (launch and Python overhead removed), or None
    when it cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as exc:
        print(f"benchmark: CUDA graph capture failed ({exc}); no graph timing", file=sys.stderr)
        return None
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def loss_bytes_moved(preds, targets):
    """Fewest bytes one forward+backward must move: forward reads every input once and writes the
    per-pixel log-sum-exp; backward reads them again and writes one gradient per prediction."""
    inputs = sum(t.numel() * t.element_size() for t in preds + targets)
    lse = targets[0].numel() * 4
    grads = sum(p.numel() * p.element_size() for p in preds)
    return (inputs + lse) + (inputs + lse + grads)


def bench_loss(device, repeats):
    rows = []
    bandwidth = copy_bandwidth(device) if device == "cuda" else None
    for name, B, C, H, W in LOSS_SHAPES:
        preds, targets = loss_inputs(B, C, H, W, device)
        row = {"op": "fused_dense_loss fwd+bwd", "shape": f"{name} B{B} C{C} {H}x{W}", "device": device}
        for variant, fn in (("eager", reference.fused_dense_loss), ("fused", fused_dense_loss)):
            row[f"{variant}_ms"] = 1e3 * median_time(lambda: loss_step(fn, preds, targets), device, repeats)
            if device == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                grads = loss_step(fn, preds, targets)
                torch.cuda.synchronize()
                row[f"{variant}_peak_extra_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                del grads
            else:
                row[f"{variant}_peak_extra_MB"] = cpu_peak_extra_memory(variant, (B, C, H, W)) / 2**20
            if device == "cuda":
                graph_s = cuda_graph_time(lambda: loss_step(fn, preds, targets))
                row[f"{variant}_gpu_ms"] = None if graph_s is None else 1e3 * graph_s
        row["speedup"] = row["eager_ms"] / row["fused_ms"]
        row["grad_buffer_MB"] = sum(p.numel() * p.element_size() for p in preds) / 2**20
        if bandwidth:
            row["floor_ms"] = 1e3 * loss_bytes_moved(preds, targets) / bandwidth
            row["copy_GBps"] = bandwidth / 1e9
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# Gradient aggregation: mtvision (Gramian op -> T weights -> weighted-sum op, on the per-parameter
# chunks, written into buffers allocated once as the trainer's .grad storage) against the LibMTL way (flatten every task's gradients through a CPU buffer, then Python
# loops over task pairs with a host sync per pair).

def resnet50_chunks(T, device, dtype=torch.float32):
    """Per-task gradients shaped like ResNet-50's parameters (25.6M): a list of [T, *shape] chunks."""
    import timm

    shapes = [p.shape for p in timm.create_model("resnet50", pretrained=False).parameters()]
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(T, *s, generator=g, device=device, dtype=dtype) for s in shapes]


def libmtl_flatten(chunks):
    """LibMTL's _grad2vec: each task's gradients copied parameter by parameter into a flat buffer
    (on the host), then moved to the device."""
    T, device = chunks[0].shape[0], chunks[0].device
    P = sum(c[0].numel() for c in chunks)
    flat = torch.zeros(T, P)
    for t in range(T):
        begin = 0
        for c in chunks:
            n = c[t].numel()
            flat[t, begin:begin + n] = c[t].reshape(-1).cpu()
            begin += n
    return flat.to(device)


def libmtl_pcgrad(chunks, rng):
    """LibMTL's PCGrad: projections in a shuffled order, a .item()-style branch per task pair."""
    grads = libmtl_flatten(chunks)
    T = grads.shape[0]
    projected = grads.clone()
    for i in range(T):
        order = list(range(T))
        rng.shuffle(order)
        for j in order:
            g_ij = torch.dot(projected[i], grads[j])
            if g_ij < 0:  # host sync
                projected[i] -= g_ij * grads[j] / grads[j].norm().pow(2)
    return projected.sum(0)


def libmtl_mgda(chunks):
    """LibMTL's MGDA (Sener & Koltun's MinNormSolver): per-pair dot products read back with .item(),
    Frank-Wolfe on the host (numpy), then a Python loop for the weighted sum."""
    import numpy as np

    grads = libmtl_flatten(chunks)
    T = grads.shape[0]
    gram = np.zeros((T, T))
    for i in range(T):
        for j in range(i, T):
            gram[i, j] = gram[j, i] = torch.dot(grads[i], grads[j]).item()
    sol = np.full(T, 1.0 / T)
    for _ in range(250):  # Frank-Wolfe with exact line search, as MinNormSolver
        grad_dir = gram @ sol
        k = int(np.argmin(grad_dir))
        v1v1, v1v2, v2v2 = sol @ gram @ sol, sol @ gram[:, k], gram[k, k]
        gamma = 1.0 if v1v2 >= v1v1 else (0.0 if v1v2 >= v2v2 else (v2v2 - v1v2) / (v1v1 + v2v2 - 2 * v1v2))
        new = gamma * sol
        new[k] += 1 - gamma
        if np.abs(new - sol).sum() < 1e-5:
            sol = new
            break
        sol = new
    out = torch.zeros_like(grads[0])
    for t in range(T):
        out += float(sol[t]) * grads[t]
    return out


def bench_aggregation(device, repeats):
    import random

    from mtvision.balancing.aggregators import MGDA, PCGrad

    rows = []
    for T in (3, 10):
        chunks = resnet50_chunks(T, device)
        P = sum(c[0].numel() for c in chunks)
        generator = torch.Generator(device=device).manual_seed(0)
        rng = random.Random(0)
        outs = [torch.empty(c.shape[1:], device=device) for c in chunks]
        methods = [("pcgrad", PCGrad(), lambda: libmtl_pcgrad(chunks, rng)),
                   ("mgda", MGDA(), lambda: libmtl_mgda(chunks))]
        for name, method, baseline in methods:
            def ours(method=method):  # into persistent .grad-like buffers, as the trainer does
                w = method.weights(gram_matrix(chunks), generator)
                return weighted_sum(chunks, w, out=outs)

            row = {"op": f"{name} aggregate (baseline: LibMTL-style)", "shape": f"T{T} P{P / 1e6:.1f}M",
                   "device": device}
            row["eager_ms"] = 1e3 * median_time(baseline, device, max(3, repeats // 3), warmup=1)
            row["fused_ms"] = 1e3 * median_time(ours, device, repeats, warmup=2)
            row["speedup"] = row["eager_ms"] / row["fused_ms"]
            if name == "mgda":  # same method both ways: the results must agree
                ref, got = baseline(), torch.cat([c.reshape(-1) for c in ours()])
                row["rel_diff"] = ((got - ref).norm() / ref.norm()).item()
            rows.append(row)
        rows.append(_graddrop_row(chunks, outs, T, P, device, repeats))
        rows.append(_excess_risk_row(chunks, T, P, device, repeats))
        del chunks
    return rows


def eager_graddrop(chunks, generator):
    """GradDrop's parameter-level combination in eager PyTorch, per chunk: the per-task masks of the
    paper from a tensor of ``torch.rand`` draws (what ``sign_dropout_sum`` does in one pass)."""
    out = []
    for c in chunks:
        u = torch.rand(c.shape[1:], generator=generator, device=c.device)
        mass = c.abs().sum(0)
        purity = 0.5 * (1 + c.sum(0) / torch.where(mass > 0, mass, 1.0))
        keep = ((purity > u) & (c > 0)) | ((purity < u) & (c < 0))
        out.append((c * keep).sum(0))
    return out


def _graddrop_row(chunks, outs, T, P, device, repeats):
    from mtvision.ops import sign_dropout_sum

    generator = torch.Generator(device=device).manual_seed(0)
    row = {"op": "graddrop combine (baseline: eager masks + torch.rand)", "shape": f"T{T} P{P / 1e6:.1f}M",
           "device": device}
    row["eager_ms"] = 1e3 * median_time(lambda: eager_graddrop(chunks, generator), device, max(3, repeats // 3),
                                        warmup=1)
    row["fused_ms"] = 1e3 * median_time(lambda: sign_dropout_sum(chunks, 12345, out=outs), device, repeats,
                                        warmup=2)
    row["speedup"] = row["eager_ms"] / row["fused_ms"]
    return row


def eager_excess_risk(chunks, accumulator):
    """ExcessMTL's AdaGrad step in eager PyTorch (what ``excess_risk_step`` does in one pass): ``A += g²``,
    then per task the sum of ``g² / sqrt(A + 1e-7)``, with multi-tensor ops and a temporary of T x P."""
    T = chunks[0].shape[0]
    torch._foreach_addcmul_(accumulator, chunks, chunks)
    ratio = torch._foreach_add(accumulator, 1e-7)
    torch._foreach_rsqrt_(ratio)
    torch._foreach_mul_(ratio, chunks)
    torch._foreach_mul_(ratio, chunks)
    return torch.stack([r.reshape(T, -1).sum(1, dtype=torch.float64) for r in ratio]).sum(0)


def _excess_risk_row(chunks, T, P, device, repeats):
    from mtvision.ops import excess_risk_step

    eager_acc = [torch.zeros_like(c) for c in chunks]
    fused_acc = [torch.zeros_like(c) for c in chunks]
    row = {"op": "excessmtl AdaGrad step (baseline: eager multi-tensor ops)", "shape": f"T{T} P{P / 1e6:.1f}M",
           "device": device}
    row["eager_ms"] = 1e3 * median_time(lambda: eager_excess_risk(chunks, eager_acc), device,
                                        max(3, repeats // 3), warmup=1)
    row["fused_ms"] = 1e3 * median_time(lambda: excess_risk_step(chunks, fused_acc), device, repeats, warmup=2)
    row["speedup"] = row["eager_ms"] / row["fused_ms"]
    # one more step each from equal accumulators: the two agree
    eager_acc = [torch.zeros_like(c) for c in chunks]
    fused_acc = [torch.zeros_like(c) for c in chunks]
    ref, got = eager_excess_risk(chunks, eager_acc), excess_risk_step(chunks, fused_acc)
    row["rel_diff"] = ((got - ref).abs().max() / ref.abs().max()).item()
    return row


def bench_solve(repeats):
    """Host time of each gradient method's T x T solve (``weights_from(gram, stats)``), which the device waits for
    once per step: the trainer brings the Gramian to the host, solves, and sends T weights back."""
    from mtvision.balancing import AGGREGATORS

    rows = []
    for T in (3, 10):
        g = torch.Generator().manual_seed(T)
        # conflicting task gradients: a shared direction plus larger task-specific parts
        J = torch.randn(1, 256, generator=g, dtype=torch.float64) + 2 * torch.randn(T, 256, generator=g,
                                                                                    dtype=torch.float64)
        # SDMGrad and MoDo solve on the [KT, KT] Gramian of K = 3 batches (the same gradients, perturbed);
        # ExcessMTL also reads per-task statistics of the gradients (here their squared norms)
        J3 = J.repeat(3, 1) + 0.1 * torch.randn(3 * T, 256, generator=g, dtype=torch.float64)
        for name, cls in AGGREGATORS.items():
            method, gen = cls(), torch.Generator().manual_seed(0)
            rows_J = J if cls.batches_per_step == 1 else J3
            gram, stats = rows_J @ rows_J.T, rows_J[:T].pow(2).sum(1)
            t = median_time(lambda: method.weights_from(gram, stats, gen), "cpu", max(repeats, 20) * 5,
                            warmup=5)
            rows.append({"op": f"{name} weights from the Gramian (host solve)", "shape": f"T{T}",
                         "device": f"cpu {torch.get_num_threads()} threads", "host_ms": 1e3 * t})
    return rows


def dispatched_ops(fn) -> int:
    """Operator calls (ATen and custom ops, views included) one call of ``fn`` makes: the host work that
    bounds a step on a GPU fast enough to wait for its kernel launches, whatever machine counts it."""
    from torch.profiler import ProfilerActivity, profile

    def outermost(e) -> bool:  # an operator not called by another one (record_function scopes don't count)
        p = e.cpu_parent
        while p is not None:
            if "::" in p.name:
                return False
            p = p.cpu_parent
        return True

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if "::" in e.name and outermost(e))


# ------------------------------------------------------------------------------------------------
# One training step of the synthetic 3-task model with each balancing method, against EW and against
# the passes a parameter-level method cannot avoid: one forward and T backward passes.

STEP_METHODS = [("ew", "param"), ("pcgrad", "param"), ("mgda", "param"), ("cagrad", "param"),
                ("nashmtl", "param"), ("upgrad", "param"), ("mgda", "rep"), ("pcgrad", "rep"), ("upgrad", "rep"),
                ("gradvac", "param"), ("graddrop", "param"), ("dbmtl", "param"), ("fairgrad", "param"),
                ("moco", "param"), ("excessmtl", "param"), ("sdmgrad", "param"), ("modo", "param"),
                ("config", "param"), ("dualproj", "param"), ("graddrop", "rep"), ("gls", "loss"),
                ("stch", "loss")]


def paired_ratios(fns, device, rounds, per_round, warmup=2):
    """Time several callables in interleaved rounds (``per_round`` calls of each, the order rotated every
    round) so that slow drifts of the machine (clocks, other load, a GPU warming up) hit all of them alike.

    Returns ``{name: [mean seconds per call, one per round]}``; a ratio is then taken per round and its
    median reported, which is much steadier than the ratio of two medians measured minutes apart."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync(device)
    out = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(per_round):
                fns[name]()
            sync(device)
            out[name].append((time.perf_counter() - t0) / per_round)
    return out


def median_ratio(a, b):
    return statistics.median(x / y for x, y in zip(a, b))


class StepSetup(NamedTuple):
    """A model and batch the step rows are measured on. ``calls_per_timing``: steps averaged per timing
    on the CPU (short steps need several; every GPU timing averages 10); ``compare_batched``: also time
    one ``is_grads_batched`` pass against the T passes."""

    shape: str
    overrides: tuple[str, ...]
    calls_per_timing: int = 1
    compare_batched: bool = False


# The synthetic model, and a copy so small that the host's work per operator call is all a step costs,
# as on a GPU step bound by kernel launches (measurable on any machine).
STEP_SETUPS = [
    StepSetup("resnet18 3-task B8 128x160", ("data.batch_size=8",), compare_batched=True),
    StepSetup("host-bound: test_resnet, 16-channel FPN and heads, B2 32x32",
              ("data.batch_size=2", "data.size=[32,32]", "model.backbone.name=test_resnet",
               "model.neck.out_channels=16", "model.heads.seg.channels=16", "model.heads.depth.channels=16",
               "model.heads.normal.channels=16"), calls_per_timing=10),
]
# The limits: a parameter-level step against the passes it needs, a rep-level one against EW. A
# loss weighting ("loss") is one backward like EW: its row has the ratio to EW and no limit.
STEP_LIMITS = {"param": ("ratio_to_floor", 1.15), "rep": ("ratio_to_ew", 1.3)}


def bench_training_step(device, repeats, methods=None):
    """One training step per method and setup (``STEP_SETUPS``); the EW step and the passes the method
    needs timed in the same interleaved rounds, see ``paired_ratios``. A method that draws K batches a
    step (SDMGrad, MoDo) needs K forwards and K*T backward passes, and its ratio to EW is per K batches.
    ``methods``: only these ``name:level`` rows (EW's own row always)."""
    from mtvision.config import load_config
    from mtvision.engine import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = [f"train.device={device}", "data.num_workers=0", "train.log_interval=1000"]
    if device == "cuda":
        base.append("train.amp=bf16")
    # a launch-bound GPU step varies by +-15 % from call to call: more rounds there
    rounds = max(3, repeats if device == "cuda" else repeats // 2)
    rows = []
    for setup in STEP_SETUPS:
        def trainer_for(name, level):
            level = "param" if level == "loss" else level
            cfg = load_config(os.path.join(root, "configs/synthetic/mtl_resnet18.yaml"),
                              [*base, *setup.overrides, f"balancer.name={name}", f"balancer.level={level}"])
            return Trainer(cfg, console=False, progress=False)

        shape = setup.shape
        ew = trainer_for("ew", "param")
        batch = next(iter(ew.train_loader))
        per_round = 10 if device == "cuda" else setup.calls_per_timing  # GPU steps are short
        for name, level in STEP_METHODS:
            if methods and name != "ew" and f"{name}:{level}" not in methods:
                continue
            trainer = ew if name == "ew" else trainer_for(name, level)
            K = trainer.balancer.batches_per_step
            step_batch = batch if K == 1 else [batch] * K
            fns = {"step": lambda: trainer.run_step(step_batch),
                   "ew": lambda: [ew.run_step(batch) for _ in range(K)]}
            if level == "param" and name != "ew":
                passes = per_task_passes(trainer, batch)[0]
                fns["floor"] = passes if K == 1 else lambda: [passes() for _ in range(K)]
            if name == "ew":
                del fns["ew"]
            times = paired_ratios(fns, device, rounds, per_round)
            row = {"op": f"train step {name} ({level})", "shape": shape, "device": device,
                   "step_ms": 1e3 * statistics.median(times["step"]),
                   "ratio_to_ew": 1.0 if name == "ew" else median_ratio(times["step"], times["ew"]),
                   "step_ops": dispatched_ops(fns["step"])}
            if "floor" in times:
                row["floor_ms"] = 1e3 * statistics.median(times["floor"])
                row["ratio_to_floor"] = median_ratio(times["step"], times["floor"])
                row["floor_ops"] = dispatched_ops(fns["floor"])
            if name != "ew" and level in STEP_LIMITS:
                key, limit = STEP_LIMITS[level]
                row["limit"] = f"{key} <= {limit}"
                row["within"] = row[key] <= limit
            rows.append(row)
            if trainer is not ew:
                del trainer
        if setup.compare_batched:
            # How the per-task gradients are taken: T backward passes from the task outputs (what the
            # trainer does) against one vmapped pass over the T losses (autograd's is_grads_batched)
            sequential, batched = per_task_passes(ew, batch)
            times = paired_ratios({"sequential": sequential, "batched": batched}, device, rounds, per_round)
            rows.append({"op": "per-task gradients: one is_grads_batched pass vs T passes", "shape": shape,
                         "device": device, "sequential_ms": 1e3 * statistics.median(times["sequential"]),
                         "batched_ms": 1e3 * statistics.median(times["batched"]),
                         "batched_over_sequential": median_ratio(times["batched"], times["sequential"])})
        del ew
    return rows


def per_task_passes(trainer, batch):
    """``(sequential, batched)``: the passes a parameter-level method needs, alone: one forward, then
    either the loss backward to the task outputs and per task a backward from its output through its
    head and the backbone (``sequential``, what ``GradientBalancer`` does), or one backward of the T
    losses vmapped over the rows of the identity (``batched``)."""
    model, loss_fn, tasks = trainer.model, trainer.loss_fn, trainer.tasks
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    inputs_of = [shared + list(model.task_parameters(t)) for t in tasks]  # listed once, as the balancer does
    heads = [p for t in tasks for p in model.task_parameters(t)]
    images = batch["image"].to(trainer.device)
    targets = {t: batch[t].to(trainer.device) for t in tasks}

    def forward():
        with trainer.autocast():
            outputs = model(images)
        return outputs, loss_fn.task_losses(outputs, targets)

    def sequential():
        outputs, losses = forward()
        outs = [outputs[t] for t in tasks]
        out_grads = torch.autograd.grad(losses.sum(), outs, retain_graph=True)
        for i in range(len(tasks)):
            torch.autograd.grad(outs[i], inputs_of[i], out_grads[i],
                                retain_graph=i < len(tasks) - 1, allow_unused=True)

    def batched():
        _, losses = forward()
        eye = torch.eye(len(tasks), device=losses.device, dtype=losses.dtype)
        torch.autograd.grad(losses, shared + heads, eye, is_grads_batched=True, allow_unused=True)

    return sequential, batched


# The limit: EW with the gradient monitor every 10 steps, against EW, over those 10 steps
MONITOR_LIMIT = 1.1


def bench_monitor(device, repeats):
    """EW training with the task-relation monitor every 10 steps (``train.monitor_interval=10``: the
    Gramian of the per-task gradients, measured within the step) and with the lookahead affinity too
    (``train.affinity_interval=10``), against plain EW: blocks of 10 steps (one of them measuring) timed
    in interleaved rounds, per ``STEP_SETUPS`` model."""
    from mtvision.config import load_config
    from mtvision.engine import Trainer
    from mtvision.relations.hook import TaskRelationHook

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = [f"train.device={device}", "data.num_workers=0", "train.log_interval=1000"]
    if device == "cuda":
        base.append("train.amp=bf16")
    rounds = max(3, repeats if device == "cuda" else repeats // 3)
    variants = {"ew": [], "monitor": ["train.monitor_interval=10"],
                "monitor+affinity": ["train.monitor_interval=10", "train.affinity_interval=10"]}
    rows = []
    for setup in STEP_SETUPS:
        trainers, batch = {}, None
        for name, extra in variants.items():
            cfg = load_config(os.path.join(root, "configs/synthetic/mtl_resnet18.yaml"),
                              [*base, *setup.overrides, *extra])
            trainers[name] = Trainer(cfg, console=False, progress=False)
            batch = batch if batch is not None else next(iter(trainers[name].train_loader))

        def ten_steps(trainer):
            hooks = [h for h in trainer.hooks if isinstance(h, TaskRelationHook)]
            for h in hooks:
                h.before_train()

            def run():
                for _ in range(10):  # trainer.iteration advances: exactly one of 10 consecutive steps measures
                    for h in hooks:
                        h.before_step(batch)
                    out = trainer.run_step(batch)
                    for h in hooks:
                        h.after_step(out)
            return run

        times = paired_ratios({n: ten_steps(t) for n, t in trainers.items()}, device, rounds, 1, warmup=1)
        ew_ms = 1e3 * statistics.median(times["ew"]) / 10
        for name in ("monitor", "monitor+affinity"):
            ratio = median_ratio(times[name], times["ew"])
            row = {"op": f"EW, {name} every 10 steps", "shape": setup.shape, "device": device,
                   "step_ms": 1e3 * statistics.median(times[name]) / 10, "ew_step_ms": ew_ms,
                   "ratio_to_ew": ratio}
            if name == "monitor":
                row["limit"] = f"ratio_to_ew <= {MONITOR_LIMIT}"
                row["within"] = ratio <= MONITOR_LIMIT
            rows.append(row)
        del trainers
    return rows


ARCHITECTURES = ["hps", "soft_sharing", "cross_stitch", "mtan", "padnet"]


def forward_flops(model, images) -> int:
    """Floating-point operations of one forward (torch's FlopCounterMode: 2 per multiply-add of the convs
    and matmuls, which is what FLOP figures of vision models count)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return int(counter.get_total_flops())


def bench_architectures(device, repeats):
    """The demo model (``configs/synthetic/demo.yaml``: ResNet-18, 64-channel FPN and heads, 128x160) as
    each ``model.arch``: parameters, forward GFLOPs per image, and one EW training step (batch 8) timed
    in interleaved rounds against hard sharing (``hps``)."""
    from mtvision.config import load_config
    from mtvision.engine import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = [f"train.device={device}", "data.num_workers=0", "train.log_interval=1000", "data.batch_size=8"]
    if device == "cuda":
        base.append("train.amp=bf16")
    trainers, batch, info = {}, None, {}
    for arch in ARCHITECTURES:
        cfg = load_config(os.path.join(root, "configs/synthetic/demo.yaml"), [*base, f"model.arch.name={arch}"])
        trainer = Trainer(cfg, console=False, progress=False)
        batch = batch if batch is not None else next(iter(trainer.train_loader))
        model = trainer.model
        size = list(cfg.data.size)
        was_training = model.training
        model.eval()
        flops = forward_flops(model, torch.zeros(1, 3, *size, device=trainer.device))
        model.train(was_training)
        info[arch] = (sum(p.numel() for p in model.parameters()), flops, size)
        trainers[arch] = trainer
    rounds = max(3, repeats if device == "cuda" else repeats // 3)
    times = paired_ratios({a: (lambda t=t: t.run_step(batch)) for a, t in trainers.items()}, device, rounds, 1)
    rows = []
    for arch in ARCHITECTURES:
        params, flops, size = info[arch]
        rows.append({"op": f"model.arch={arch}, EW step", "shape": f"demo: resnet18 B8 {size[0]}x{size[1]}",
                     "device": device, "params_M": params / 1e6, "gflops_per_image": flops / 1e9,
                     "step_ms": 1e3 * statistics.median(times[arch]),
                     "ratio_to_hps": median_ratio(times[arch], times["hps"])})
    return rows


# (row name, config overrides): the precision and speed switches of train.*; fp16 needs CUDA
SWITCHES = [("fp32 (none)", []), ("channels_last", ["train.channels_last=true"]),
            ("bf16 autocast", ["train.amp=bf16"]), ("bf16 + channels_last", ["train.amp=bf16", "train.channels_last=true"]),
            ("fp16 autocast + GradScaler", ["train.amp=fp16"]), ("torch.compile", ["train.compile=true"])]


def bench_switches(device, repeats):
    """One EW training step of the synthetic 3-task ResNet-18 model per switch, as a ratio to fp32; the
    compiled row is timed after its compilation (done in the warm-up)."""
    from mtvision.config import load_config
    from mtvision.engine import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = [f"train.device={device}", "data.num_workers=0", "data.batch_size=8", "train.log_interval=1000"]
    rows, ref_ms, batch = [], None, None
    for name, overrides in SWITCHES:
        if "train.amp=fp16" in overrides and device != "cuda":
            continue
        cfg = load_config(os.path.join(root, "configs/synthetic/mtl_resnet18.yaml"), base + overrides)
        trainer = Trainer(cfg, console=False, progress=False)
        if batch is None:
            batch = next(iter(trainer.train_loader))
        step_ms = 1e3 * median_time(lambda: trainer.run_step(batch), device, max(3, repeats // 2), warmup=3)
        ref_ms = ref_ms or step_ms
        rows.append({"op": f"train step, {name}", "shape": "resnet18 3-task B8 128x160", "device": device,
                     "step_ms": step_ms, "ratio_to_fp32": step_ms / ref_ms})
        del trainer
    return rows


# ------------------------------------------------------------------------------------------------
# Data loading: NYUv2-size samples in MTAN's preprocessed .npy layout (written to a temporary folder)
# through the whole RawDataset path (read files -> checks -> transform -> tensors), in this process with
# one OpenCV and one torch thread: the rate one DataLoader worker sustains.

DATA_SHAPE = ("nyuv2", 288, 384)
DATA_SAMPLES = 16


def write_nyuv2_npy_fixture(root, n, H, W, seed=0):
    """``n`` random samples in the MTAN layout root/train/{image,label,depth,normal}/{i}.npy (float32)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for d in ("image", "label", "depth", "normal"):
        os.makedirs(os.path.join(root, "train", d), exist_ok=True)
    for i in range(n):
        normal = rng.normal(size=(H, W, 3)).astype(np.float32)
        normal /= np.linalg.norm(normal, axis=2, keepdims=True)
        depth = rng.uniform(0.5, 10.0, size=(H, W, 1)).astype(np.float32)
        depth[rng.random((H, W)) < 0.1] = 0.0
        arrays = {"image": rng.random((H, W, 3), dtype=np.float32),
                  "label": rng.integers(-1, 13, size=(H, W)).astype(np.float32),
                  "depth": depth, "normal": normal}
        for d, a in arrays.items():
            np.save(os.path.join(root, "train", d, f"{i}.npy"), a)


def bench_data(repeats):
    import tempfile

    import cv2

    from mtvision.config import AugmentConfig, DataConfig
    from mtvision.data import NYUv2
    from mtvision.data.transforms import build_transform

    name, H, W = DATA_SHAPE
    # MTAN's training augmentation (random scale 1..1.5 with crop back, horizontal flip), then colour
    # jitter on top
    mtan = AugmentConfig(hflip=0.5, scale_range=(1.0, 1.5))
    jitter = AugmentConfig(hflip=0.5, scale_range=(1.0, 1.5), color_jitter=0.4)
    variants = [("read + check + tensors", None), ("+ train transform (scale, crop, flip)", mtan),
                ("+ colour jitter 0.4", jitter)]
    rows = []
    cv2_threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as root:
            write_nyuv2_npy_fixture(root, DATA_SAMPLES, H, W)
            for label, augment in variants:
                transform = None
                if augment is not None:
                    data = DataConfig(dataset="nyuv2", root=root, size=(H, W), num_classes=13,
                                      augment=augment)
                    transform = build_transform(data, train=True)
                ds = NYUv2(root, "train", transform=transform)
                wall, cpu = [], []
                for rep in range(repeats + 1):  # the first pass is the warm-up
                    t0, c0 = time.perf_counter(), time.process_time()
                    for i in range(len(ds)):
                        ds[(i, (rep, i))]  # a fresh augmentation seed per pass, as the sampler gives
                    wall.append((time.perf_counter() - t0) / len(ds))
                    cpu.append((time.process_time() - c0) / len(ds))
                t = statistics.median(wall[1:])
                # process CPU time: what the worker itself spends, whatever else the machine is running
                rows.append({"op": f"data nyuv2 npy: {label}", "shape": f"{name} {H}x{W}",
                             "device": "cpu 1 thread", "ms_per_sample": 1e3 * t,
                             "cpu_ms_per_sample": 1e3 * statistics.median(cpu[1:]), "samples_per_s": 1.0 / t})
    finally:
        cv2.setNumThreads(cv2_threads)
        torch.set_num_threads(torch_threads)
    return rows


# ------------------------------------------------------------------------------------------------
# Inference: the synthetic 3-task ResNet-18 (mtl_resnet18.yaml's model, random weights) at the LibMTL
# NYUv2 and Cityscapes input sizes.

INFERENCE_SHAPES = [("nyuv2", 288, 384), ("cityscapes", 256, 512)]
INFERENCE_BATCHES = (1, 8)
# onnxruntime execution providers tried per --device, in this order (those the installed package has)
ORT_PROVIDERS = {"cpu": ["CPUExecutionProvider"],
                 "cuda": ["CUDAExecutionProvider", "TensorrtExecutionProvider"]}


def latency_row(run, device, repeats, batch, warmup=2):
    """Images per second (batch / median latency) and the latency percentiles of ``run()``, one batch."""
    import numpy as np

    for _ in range(warmup):
        run()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    p50, p90, p99 = (1e3 * float(v) for v in np.percentile(times, [50, 90, 99]))
    return {"images_per_s": batch / (p50 / 1e3), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99}


def bench_inference(device, repeats):
    import tempfile

    import onnxruntime as ort

    from mtvision.config import load_config
    from mtvision.config.validation import config_to_dict
    from mtvision.export import INPUT_NAME, export_onnx, onnx_session
    from mtvision.models import build_model

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs/synthetic/mtl_resnet18.yaml"))
    torch.manual_seed(0)
    model = build_model(config_to_dict(cfg.model)).eval()
    providers = [p for p in ORT_PROVIDERS[device] if p in ort.get_available_providers()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # one file for every shape: dynamic batch and size
        path = export_onnx(model, os.path.join(tmp, "model.onnx"), INFERENCE_SHAPES[0][1:], dynamic_size=True)
        sessions = {}
        for provider in providers:
            try:
                sessions[provider] = onnx_session(path, [provider], threads=torch.get_num_threads())
            except Exception as e:  # noqa: BLE001 - a provider the machine cannot run: say so, go on
                print(f"onnxruntime {provider}: cannot start ({type(e).__name__}: {e})")
        model = model.to(device)
        compiled = torch.compile(model, dynamic=False)  # specialised to each shape, as deployed
        for name, H, W in INFERENCE_SHAPES:
            for B in INFERENCE_BATCHES:
                x = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(0))
                xd, feed = x.to(device), {INPUT_NAME: x.numpy()}
                shape = f"{name} B{B} {H}x{W}"

                def forward(fn=model):
                    with torch.no_grad():
                        return fn(xd)

                rows.append({"op": "inference, PyTorch eager", "shape": shape, "device": device,
                             **latency_row(forward, device, repeats, B)})
                t0 = time.perf_counter()
                forward(compiled)  # compiles for this shape
                sync(device)
                compile_s = time.perf_counter() - t0
                rows.append({"op": "inference, torch.compile", "shape": shape, "device": device,
                             **latency_row(lambda: forward(compiled), device, repeats, B),
                             "compile_s": compile_s})
                for provider, session in sessions.items():
                    rows.append({"op": f"inference, onnxruntime {provider.replace('ExecutionProvider', '')}",
                                 "shape": shape, "device": device,
                                 **latency_row(lambda s=session: s.run(None, feed), "cpu", repeats, B)})
    return rows


def print_table(rows):
    cols = ["op", "shape", "device", "eager_ms", "fused_ms", "speedup", "host_ms", "step_ms", "ratio_to_ew",
            "ratio_to_floor", "limit", "within", "step_ops", "floor_ops", "sequential_ms", "batched_ms",
            "batched_over_sequential", "ratio_to_fp32", "ms_per_sample", "cpu_ms_per_sample", "samples_per_s",
            "images_per_s", "p50_ms", "p90_ms", "p99_ms", "compile_s", "params_M", "gflops_per_image", "ratio_to_hps",
            "eager_gpu_ms", "fused_gpu_ms",
            "floor_ms", "eager_peak_extra_MB", "fused_peak_extra_MB", "grad_buffer_MB", "rel_diff"]
    cols = [c for c in cols if any(c in r for r in rows)]
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.2e}" if 0 < abs(v) < 0.01 else f"{v:.2f}"
        return str(v)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--only", choices=["loss", "aggregation", "solve", "step", "monitor", "switches",
                                           "data", "inference", "arch"], help="run one group of rows")
    parser.add_argument("--methods", nargs="+", metavar="NAME:LEVEL",
                        help="step rows of these methods only (e.g. dbmtl:param graddrop:rep gls:loss)")
    parser.add_argument("--_memory-probe", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory_probe:
        variant, *shape = args._memory_probe
        memory_probe(variant, *map(int, shape))
        return
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            sys.exit("benchmark: --device cuda but no GPU is available")
        devices.remove("cuda")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    rows = []
    for device in devices:
        if args.only in (None, "loss"):
            rows += bench_loss(device, args.repeats)
        if args.only in (None, "aggregation"):
            rows += bench_aggregation(device, args.repeats)
        if args.only in (None, "step"):
            rows += bench_training_step(device, args.repeats, args.methods)
        if args.only in (None, "monitor"):
            rows += bench_monitor(device, args.repeats)
        if args.only in (None, "switches"):
            rows += bench_switches(device, args.repeats)
        if args.only in (None, "arch"):
            rows += bench_architectures(device, args.repeats)
        if args.only in (None, "inference"):
            rows += bench_inference(device, args.repeats)
    if args.only in (None, "solve"):  # host work, whatever --device says
        rows += bench_solve(args.repeats)
    if args.only in (None, "data"):  # CPU work, whatever --device says
        rows += bench_data(args.repeats)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
