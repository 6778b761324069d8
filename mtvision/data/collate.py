"""Batching of tensor sample dicts (:func:`mtvision.data.sample.to_tensor_sample`): dense maps stacked,
boxes, labels and meta as per-sample lists."""

from __future__ import annotations

import torch

from .sample import SkippedSample

#: Dense keys stacked into one tensor per batch; everything else is kept as a per-sample list.
DENSE_KEYS = ("image", "seg", "depth", "normal")


def collate_samples(batch: list[dict]) -> dict:
    """Collate sample dicts into a batch dict.

    ``image [B,3,H,W]``, ``seg [B,H,W]``, ``depth [B,1,H,W]``, ``normal [B,3,H,W]`` are stacked (only the
    keys present in the samples); ``boxes``, ``labels``, ``meta`` and any other key become lists of
    length B (boxes differ in number per image). Every sample must have the same keys.

    Samples a dataset with ``skip_bad`` could not read (:class:`~mtvision.data.sample.SkippedSample`, or
    ``None``) are dropped, counted in ``num_skipped`` and their reasons (naming the file) listed in
    ``skipped_files`` (both present only when some were); a batch of nothing but skipped samples is
    ``{"num_skipped": n, "skipped_files": [...]}``.
    """
    if not batch:
        raise ValueError("collate_samples: empty batch")
    bad = [sample for sample in batch if sample is None or isinstance(sample, SkippedSample)]
    skipped = len(bad)
    if skipped:
        reasons = [s.reason if s is not None else "an unreadable sample" for s in bad]
        batch = [sample for sample in batch if sample is not None and not isinstance(sample, SkippedSample)]
        if not batch:
            return {"num_skipped": skipped, "skipped_files": reasons}
    keys = list(batch[0].keys())
    for i, sample in enumerate(batch):
        if set(sample.keys()) != set(keys):
            raise ValueError(f"collate_samples: sample {i} has keys {sorted(sample)}, "
                             f"expected {sorted(keys)} as sample 0")
    out: dict = {}
    for key in keys:
        values = [sample[key] for sample in batch]
        if key in DENSE_KEYS:
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(f"collate_samples: '{key}' shapes differ within the batch: "
                                 f"{sorted(shapes)}")
            out[key] = torch.stack(values, dim=0)
        else:
            out[key] = values
    if skipped:
        out["num_skipped"] = skipped
        out["skipped_files"] = reasons
    return out
