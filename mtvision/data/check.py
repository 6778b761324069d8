"""``data.check``: read every sample of a file dataset once before training, so a corrupt or mislabelled
file stops the run before any work is done (instead of at the first evaluation, an ``eval_interval``
later)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from torch.utils.data import Dataset

from .sample import DataError, RawDataset, check_raw_sample

__all__ = ["AUTO_CHECK_MAX_SAMPLES", "should_check", "find_bad_samples", "check_datasets"]

#: ``data.check: null`` reads every sample of file datasets up to this size (larger ones: set it true).
AUTO_CHECK_MAX_SAMPLES = 5000


def should_check(check: Optional[bool], dataset: Dataset) -> bool:
    """Whether ``data.check`` (``check``) asks to read ``dataset`` through: ``null`` means yes for a file
    dataset (a :class:`RawDataset`) of at most ``AUTO_CHECK_MAX_SAMPLES`` samples."""
    if not isinstance(dataset, RawDataset):
        return False
    return bool(check) if check is not None else len(dataset) <= AUTO_CHECK_MAX_SAMPLES


def find_bad_samples(dataset: RawDataset, threads: int = 4, rank: int = 0, world_size: int = 1) -> list[str]:
    """Read (and check: shapes, dtypes, label ranges) every sample of ``dataset`` — under
    torch.distributed each process reads its share (every ``world_size``-th sample) and the findings are
    gathered — and return the messages of those that fail, each naming the file and the field, in index
    order (the same list on every process)."""
    num_classes = getattr(dataset, "num_classes", None)

    def problem(index: int) -> Optional[str]:
        try:
            check_raw_sample(dataset.read_raw(index), num_classes)
        except DataError as e:
            return str(e)
        return None

    mine = range(rank, len(dataset), world_size)
    with ThreadPoolExecutor(max_workers=threads) as pool:  # decoders release the GIL
        found = [(i, p) for i, p in zip(mine, pool.map(problem, mine)) if p is not None]
    if world_size > 1:
        from ..distributed import all_gather_objects

        found = sorted(f for part in all_gather_objects(found) for f in part)
    return [p for _, p in found]


def check_datasets(check: Optional[bool], skip_bad: bool, **datasets: Dataset) -> dict[str, list[str]]:
    """Read through each named dataset that ``data.check`` selects. Raises :class:`DataError` listing the
    bad samples (up to 5, and how many) unless ``skip_bad``, which trains without them; returns
    ``{split: [problem, ...]}`` of what was found."""
    from ..distributed import dist_env

    env = dist_env()
    found = {name: find_bad_samples(ds, rank=env.rank, world_size=env.world_size)
             for name, ds in datasets.items() if should_check(check, ds)}
    bad = [(name, p) for name, problems in found.items() for p in problems]
    if bad and not skip_bad:
        shown = "; ".join(f"{name}: {p}" for name, p in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError("data.check", "samples", f"{len(bad)} unreadable sample(s) found before training: "
                        f"{shown}{more}. Fix or remove them, or set data.skip_bad=true to train without them")
    return found
