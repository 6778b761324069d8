"""Run logging: a text log in the work dir (echoed to the console through tqdm), TensorBoard scalars,
and metric tables."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

from tqdm import tqdm

__all__ = ["TqdmHandler", "ScalarWriter", "setup_logger", "log_traceback_to_file", "format_table"]

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class TqdmHandler(logging.Handler):
    """Console handler that writes through ``tqdm.write`` so log lines do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logger(work_dir: Optional[Path], name: str = "mtvision", console: bool = True,
                 filename: str = "train.log") -> logging.Logger:
    """Logger ``name`` writing to ``work_dir/filename`` (appending; none when ``work_dir`` is None) and,
    with ``console``, to stderr. Handlers from an earlier call are replaced, so a second run in the same
    process (tests) does not write to the first run's file."""
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(work_dir) / filename)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    if console:
        ch = TqdmHandler()
        ch.setFormatter(fmt)
        logger.addHandler(ch)
    return logger


def log_traceback_to_file(logger: logging.Logger, exc: BaseException) -> None:
    """Write ``exc``'s traceback to ``logger``'s files only (the console gets the one-line error)."""
    record = logger.makeRecord(logger.name, logging.ERROR, "", 0, "traceback of the failure:", (),
                               (type(exc), exc, exc.__traceback__))
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class ScalarWriter:
    """TensorBoard scalars under ``log_dir`` (``torch.utils.tensorboard.SummaryWriter``); non-finite and
    non-numeric values are skipped. Also a context manager."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard; only when logging

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def add_scalars(self, prefix: str, values: Mapping[str, object], step: int) -> None:
        """Write ``{name: number}`` as ``prefix/name`` at ``step``."""
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        """Write ``text`` under ``tag`` at ``step`` (TensorBoard's text tab)."""
        self.writer.add_text(tag, text, step)

    def add_image(self, tag: str, image, step: int) -> None:
        """Write an RGB ``uint8 [H,W,3]`` picture under ``tag`` at ``step``."""
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fmt(v) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "-" if v is None else str(v)


def format_table(rows: Sequence[str], columns: Mapping[str, Mapping[str, object]],
                 row_title: str = "metric") -> str:
    """Plain-text table: one row per key in ``rows``, one column per ``{title: {key: value}}``."""
    header = [row_title, *columns]
    body = [[r, *(_fmt(col.get(r)) for col in columns.values())] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(b) for b in body)])
