"""Training statistics of a logging window, averaged the way TRL's SFTTrainer averages its own.

TRL 1.16 (``SFTTrainer.compute_loss`` / ``log``): per micro-batch, the entropy and the token
accuracy are token means over every process (the sums and the valid-token counts are gathered and
summed across processes, then divided; 0 when no token is valid), and the logged value is the plain
mean of those per-micro-batch values over the logging window. :class:`MetricWindow` keeps one row
(entropy sum, correct tokens, valid tokens) per micro-batch on the device (no host sync per step)
and does the cross-process sum when the window is logged, or every ``FOLD_EVERY`` micro-batches
(all processes at the same micro-batch), folding the rows into running sums of the per-micro-batch
means: a window that is never logged (``logging_strategy="no"``) still holds O(1) state.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

# The names TRL logs them under.
LOGGED_NAMES = ("entropy", "mean_token_accuracy")

# Rows kept before they are folded: large enough that the fold's cross-process sum is rare next to
# the step, small enough that the rows stay a few KiB.
FOLD_EVERY = 256


class MetricWindow:
    """``sum_over_processes([k, 3]) -> [k, 3]`` sums rows over processes (None: one process); it is
    called by every process at the same micro-batch (each FOLD_EVERY-th, and at :meth:`pop`)."""

    def __init__(self, sum_over_processes: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self._rows = []
        self._reduce = sum_over_processes
        self._folded = None  # float64 [2]: sum over folded micro-batches of (entropy, accuracy) means
        self._folded_count = 0

    def add(self, metrics: dict, valid_tokens: torch.Tensor, num_items_in_batch=None) -> None:
        """Record one micro-batch. ``metrics``: gem_loss's ``return_metrics`` dict, reduced with
        ``reduction="mean"`` and this ``num_items_in_batch`` (None: over ``valid_tokens``), so each
        value times its denominator is the micro-batch's sum."""
        count = valid_tokens.detach().to(torch.float64).reshape(())
        if num_items_in_batch is None:
            denom = count.clamp(min=1)
        elif isinstance(num_items_in_batch, torch.Tensor):
            denom = num_items_in_batch.detach().to(device=count.device, dtype=torch.float64).reshape(())
            denom = torch.where(denom == 0, torch.ones_like(denom), denom)  # as gem_loss reads 0
        else:
            denom = torch.tensor(float(num_items_in_batch) or 1.0, dtype=torch.float64, device=count.device)
        ent = metrics["entropy"].detach().to(torch.float64).reshape(()) * denom.to(metrics["entropy"].device)
        acc = metrics["token_accuracy"].detach().to(torch.float64).reshape(()) * denom.to(ent.device)
        self._rows.append(torch.stack([ent, acc, count.to(ent.device)]))
        if len(self._rows) >= FOLD_EVERY:
            self._fold(self._reduce)

    def _fold(self, sum_over_processes) -> None:
        # Per micro-batch: sums and counts over processes first, then the mean (TRL's rule).
        rows = torch.stack(self._rows)
        self._rows = []
        if sum_over_processes is not None:
            rows = sum_over_processes(rows)
        count = rows[:, 2:]
        per_batch = torch.where(count > 0, rows[:, :2] / count.clamp(min=1), torch.zeros_like(rows[:, :2]))
        total = per_batch.sum(0)
        self._folded = total if self._folded is None else self._folded + total
        self._folded_count += rows.shape[0]

    def __len__(self) -> int:
        """Micro-batches recorded in this window."""
        return self._folded_count + len(self._rows)

    def held_rows(self) -> int:
        """Rows held unfolded (at most FOLD_EVERY - 1)."""
        return len(self._rows)

    def pop(self, sum_over_processes: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Optional[dict]:
        """{"entropy": float, "mean_token_accuracy": float} of the window (then emptied), or None if
        empty. ``sum_over_processes([k, 3]) -> [k, 3]`` sums the rows over processes (default: the
        one given at construction; every process must have recorded the same number of
        micro-batches, as in synchronous data parallelism)."""
        if len(self) == 0:
            return None
        if self._rows:
            self._fold(sum_over_processes if sum_over_processes is not None else self._reduce)
        entropy, accuracy = (self._folded / self._folded_count).tolist()
        self._folded, self._folded_count = None, 0
        return {"entropy": entropy, "mean_token_accuracy": accuracy}


def dist_sum(rows: torch.Tensor) -> torch.Tensor:
    """Sum over the default torch.distributed group when one is running (else unchanged)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rows = rows.clone()
        dist.all_reduce(rows, op=dist.ReduceOp.SUM)
    return rows
