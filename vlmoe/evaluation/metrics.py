"""Shared machinery for vlmoe's text metrics (captioning and VQA).

Text metrics need per-sample Python objects (token strings, reference lists, question types) in their
state, which torchmetrics' tensor reductions cannot gather across processes. ``GatheredStateMetric``
adds *object states*: plain Python lists registered through ``add_state`` (so ``reset``, ``merge_state``,
``forward`` and the sync/unsync cache keep working) and gathered with
``torch.distributed.all_gather_object``; ordinary tensor states are still synced by torchmetrics.

Notable choices:
- Object states are concatenated in rank order, so a metric computed on N processes sees exactly the
  samples a single process would have seen (in a rank-dependent order). Every corpus statistic in
  ``caption_metrics`` / ``vqa_metrics`` is order independent: integer sums, set-based document
  frequencies, and ``math.fsum`` (exactly rounded, hence order independent) for float means. The result is
  therefore bit-identical whether computed on one process or on several with the data split in any way.
- A rank that saw no data contributes an empty list (no dtype/shape padding issues, unlike empty tensor
  ``cat`` states).
- ``.to(device)`` / ``.double()`` / ``compute_on_cpu`` leave object states alone.

The task metrics live in ``vlmoe.evaluation.caption_metrics`` and ``vlmoe.evaluation.vqa_metrics``;
``vlmoe.evaluation`` re-exports the public names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

__all__ = ["GatheredStateMetric", "fsum_mean", "to_json_dict"]


def fsum_mean(values: Iterable[float]) -> float:
    """Mean with an exactly rounded (hence order-independent) sum; 0.0 for no values."""
    values = list(values)
    if not values:
        return 0.0
    return math.fsum(values) / len(values)


def to_json_dict(values: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a metric result (tensors, nested dicts) to plain ``float``/``int`` for ``metrics.json``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out[key] = to_json_dict(value)
        elif isinstance(value, Tensor):
            out[key] = int(value.item()) if not value.is_floating_point() else float(value.item())
        else:
            out[key] = value
    return out


class GatheredStateMetric(Metric):
    """A torchmetrics ``Metric`` that may keep lists of arbitrary picklable Python objects as state."""

    full_state_update: bool = False
    is_differentiable: bool = False
    _object_state_names: tuple[str, ...] = ()

    def add_object_state(self, name: str) -> None:
        """Register a list state holding Python objects (gathered with ``all_gather_object``)."""
        # dist_reduce_fx=None: merge_state / forward concatenate the lists (global first, then local).
        self.add_state(name, default=[], dist_reduce_fx=None)
        self._object_state_names = (*self._object_state_names, name)

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None) -> None:
        group = process_group or self.process_group
        names = self._object_state_names
        parts: list[Any] = []
        if names:
            local = {name: list(getattr(self, name)) for name in names}
            parts = [None] * torch.distributed.get_world_size(group)
            torch.distributed.all_gather_object(parts, local, group=group)
        tensor_reductions = {k: v for k, v in self._reductions.items() if k not in names}
        if tensor_reductions:
            # Let torchmetrics sync the tensor states only; restore the full table afterwards.
            all_reductions = self._reductions
            self._reductions = tensor_reductions
            try:
                super()._sync_dist(dist_sync_fn, process_group=process_group)
            finally:
                self._reductions = all_reductions
        for name in names:
            setattr(self, name, [item for part in parts for item in part[name]])

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> torch.nn.Module:
        return super()._apply(fn, exclude_state=(*exclude_state, *self._object_state_names))

    def _move_list_states_to_cpu(self) -> None:  # compute_on_cpu=True: object states already live on the host
        for name in self._defaults:
            value = getattr(self, name)
            if name not in self._object_state_names and isinstance(value, list):
                setattr(self, name, [item.to("cpu") for item in value])
