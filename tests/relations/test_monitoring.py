"""Task relations measured while training (``train.monitor_interval``, ``train.affinity_interval``,
``mtvision.relations.hook``), and auxiliary tasks (``train.auxiliary_tasks``)."""

from __future__ import annotations

import json

import pytest
import torch

from mtvision.config import ConfigError
from mtvision.engine import Trainer, primary_score
from mtvision.engine.hooks import HookBase
from mtvision.relations import TaskGradientProbe

from ..engine.helpers import tiny_config

SHORT = ["train.max_iters=4", "train.eval_interval=100", "train.checkpoint_interval=2"]


def _config(path, overrides):
    path.mkdir(parents=True, exist_ok=True)
    return tiny_config(path, overrides)


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_measuring_does_not_change_the_training(tmp_path):
    """The same run with and without the monitor and the affinity (BatchNorm backbone: its statistics and
    the random state are restored after every measurement) ends with identical weights."""
    plain = Trainer(_config(tmp_path / "a", SHORT))
    plain.train()
    measured = Trainer(_config(tmp_path / "b", [*SHORT, "train.monitor_interval=1",
                                                    "train.affinity_interval=2"]))
    measured.train()
    a, b = _weights(plain), _weights(measured)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rel = measured.relations
    assert rel.gradient_steps == 4 and rel.affinity_steps == 2
    summary = json.loads((tmp_path / "b" / "work" / "metrics.json").read_text())["relations"]
    assert summary["tasks"] == ["seg", "depth", "normal"]
    assert len(summary["affinity"]["mean"]) == 3 and len(summary["gradients"]["mean_cosine"][0]) == 3
    assert summary["gradients"]["steps"] == 4 and summary["affinity"]["steps"] == 2
    log = (tmp_path / "b" / "work" / "train.log").read_text()
    assert "task relations:" in log and "lookahead affinity" in log
    assert "relations" not in json.loads((tmp_path / "a" / "work" / "metrics.json").read_text())


class _ProbeBeforeStep(HookBase):
    """Measures the Gramian on the step's batch at the step's parameters with the probe, to compare with
    what the gradient method computed in the step."""

    def __init__(self):
        self.pairs = []

    def before_step(self, batch):
        t = self.trainer
        data = t._to_device(batch[0])
        probe = TaskGradientProbe(list(t.model.shared_parameters()), t.model)
        losses = lambda: t.loss_fn.task_losses(t.model(data["image"]), data).float()  # noqa: E731
        self.measured = probe.measure(losses).gram

    def after_step(self, outcome):
        self.pairs.append((self.measured, outcome.gram))


def test_a_gradient_method_gives_every_step_s_gramian_for_free(tmp_path):
    probe_hook = _ProbeBeforeStep()
    t = Trainer(tiny_config(tmp_path, [*SHORT, "balancer.name=pcgrad", "train.monitor_interval=2"]),
                hooks=[probe_hook])
    assert t.balancer.provides_gramian
    t.train()
    assert t.relations.gradient_steps == 4  # every step, not every 2nd: it costs nothing
    for measured, stepped in probe_hook.pairs:
        torch.testing.assert_close(stepped, measured, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("method,kwargs", [("ew", []), ("uw", []), ("rlw", []), ("gradnorm", []),
                                           ("ew", ["loss.weights={seg: 2.0, depth: 0.0, normal: 0.5}"])])
def test_a_loss_weighting_measures_the_gramian_within_its_step(tmp_path, method, kwargs):
    """T - 1 per-task passes and the step's own gradient give the Gramian the probe measures on the same
    batch and parameters (the weights are not all 1: UW, RLW, GradNorm, static weights with a zero)."""
    probe_hook = _ProbeBeforeStep()
    t = Trainer(tiny_config(tmp_path, [*SHORT, f"balancer.name={method}", "train.monitor_interval=1",
                                       "train.grad_clip=null", *kwargs]), hooks=[probe_hook])
    assert not t.balancer.provides_gramian
    t.train()
    assert t.relations.gradient_steps == 4
    for measured, stepped in probe_hook.pairs:
        torch.testing.assert_close(stepped, measured, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["moco", "sdmgrad"])
def test_methods_whose_gramian_is_not_the_raw_one_are_probed(tmp_path, method):
    """MoCo combines tracked gradients and SDMGrad draws three batches: their step's Gramian is not that
    of the raw task gradients, so the monitor measures on its interval."""
    t = Trainer(tiny_config(tmp_path, [*SHORT, f"balancer.name={method}", "train.monitor_interval=2",
                                       "train.affinity_interval=4"]))
    assert not t.balancer.provides_gramian
    t.train()
    assert t.relations.gradient_steps == 2 and t.relations.affinity_steps == 1


class _StopAfter(HookBase):
    def __init__(self, at):
        self.at = at

    def after_step(self, outcome):
        if self.trainer.iteration == self.at:
            raise KeyboardInterrupt


def test_resume_continues_the_relations(tmp_path):
    """Preempted after step 2 (checkpoint of step 2) and resumed: the relations summed over the 4 steps
    are those of the run that was not interrupted."""
    over = [*SHORT, "train.monitor_interval=1", "train.affinity_interval=1"]
    straight = Trainer(_config(tmp_path / "s", over))
    straight.train()
    first = Trainer(_config(tmp_path / "r", over), hooks=[_StopAfter(2)])  # as if preempted after step 2
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = Trainer(_config(tmp_path / "r", over))
    resumed.resume(tmp_path / "r" / "work" / "checkpoints" / "last.pth")
    assert resumed.relations.gradient_steps == 2
    resumed.train()
    assert resumed.relations.summary()["gradients"]["steps"] == 4
    a, b = straight.relations.state_dict(), resumed.relations.state_dict()
    for k in a:
        if torch.is_tensor(a[k]):
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
        else:
            assert a[k] == b[k], k


def test_auxiliary_tasks_are_trained_but_not_scored(tmp_path):
    t = Trainer(tiny_config(tmp_path, [*SHORT, "train.auxiliary_tasks=[normal]"]))
    t.train()
    assert t.best["score"] == pytest.approx(primary_score(t.last_metrics, ["seg", "depth"]))
    assert t.best["score"] != pytest.approx(primary_score(t.last_metrics, ["seg", "depth", "normal"]))
    summary = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert summary["auxiliary_tasks"] == ["normal"] and "normal/mean" in summary["final"]
    assert "score (without auxiliary normal)" in (tmp_path / "work" / "train.log").read_text()


@pytest.mark.parametrize("aux,message", [("[sky]", "'sky' is not a training task"),
                                         ("[seg,depth,normal]", "leaves no main task")])
def test_bad_auxiliary_tasks_are_named(tmp_path, aux, message):
    with pytest.raises(ConfigError, match=f"train.auxiliary_tasks: .*{message}"):
        Trainer(tiny_config(tmp_path, [f"train.auxiliary_tasks={aux}"]))


def test_tensorboard_gets_the_scalars_and_heatmaps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = Trainer(tiny_config(tmp_path, [*SHORT, "train.monitor_interval=2", "train.affinity_interval=2"]),
                progress=False)
    t.train()
    events = EventAccumulator(str(tmp_path / "work" / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"relations/mean_cosine", "relations/mean_affinity"} <= set(tags["images"])
    assert {"relations/cosine/seg~depth", "relations/grad_norm/normal", "relations/affinity/seg->depth",
            "relations/conflict_fraction/depth~normal"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("relations/cosine/seg~depth")] == [2, 4]
    image = events.Images("relations/mean_affinity")[-1]
    assert image.step == 4 and image.width > 100 and image.height > 100
