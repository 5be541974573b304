"""Routers: logits, weights and indices for each position, modality aware.

Notable choices:
- Router math runs in float32 whatever the activations' dtype, under autocast too.
- ``per_modality`` mode computes every modality's logits in one matmul and keeps each
  position's own row; ``partitioned`` mode masks the logits of experts reserved to other
  modalities with ``-inf``, so they get zero probability and are never selected.
- Token choice: softmax over experts, then top-k (Shazeer et al. 2017; Mixtral's order).
  Expert choice: each expert takes its top positions by probability
  (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"), so every position
  may see any number of experts; it looks at the whole sequence, so causal layers refuse it.
  It ranks within each sequence, with each expert's capacity per sequence (V-MoE's per-image
  grouping, Riquelme et al. 2021), so an image's routing does not depend on its batch-mates.
- A capacity factor is refused in causal layers too: a later token's first choice could drop
  an earlier token's assignment, and the capacity at decoding (T = batch) is not training's.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig
from .experts import Dispatch, as_dtype, autocast_off


@dataclass
class RouterOutput:
    """Attributes:
    logits: ``(T, E)`` float32 router logits after modality masking.
    probs: ``(T, E)`` softmax of ``logits``.
    weights: token choice ``(T, k)``; expert choice ``(E, S*C)``, S sequences of C picks each.
    indices: token choice ``(T, k)`` expert ids; expert choice ``(E, S*C)`` position ids.
    """

    logits: Tensor
    probs: Tensor
    weights: Tensor
    indices: Tensor


def count(index: Tensor, size: int) -> Tensor:
    """``torch.bincount(index, minlength=size)`` for indices below ``size``, without the host sync
    CUDA's bincount makes to find the largest index."""
    return torch.zeros(size, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))


class Router(nn.Module, ABC):
    """Scores each position against each expert; subclasses decide who picks whom."""

    def __init__(self, in_features: int, config: MoEConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        num_routers = config.num_modalities if config.modality_mode == "per_modality" else 1
        self.weight = nn.Parameter(torch.empty(num_routers, config.num_experts, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.weight.shape[-1] ** -0.5)

    def blocked(self, device: torch.device) -> Tensor | None:
        """``(M, E)``: True where a modality may not use an expert (partitioned mode), else None.

        Derived from the config, not a buffer: it stays right through meta-device builds and loads.
        """
        if self.config.modality_mode != "partitioned":
            return None
        return ~torch.tensor(self.config.allowed_experts(), device=device)

    def logits(self, x: Tensor, modality: Tensor | int) -> Tensor:
        """``x``: ``(T, D)``, ``modality``: ``(T,)`` ints, or one int for every position. Returns float32 ``(T, E)``."""
        if self.training and self.config.jitter_noise > 0:
            eps = self.config.jitter_noise
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        num_routers, num_experts, dim = self.weight.shape
        weight, x = as_dtype(self.weight, torch.float32), as_dtype(x, torch.float32)
        if isinstance(modality, int):  # one modality: its own router alone
            logits = F.linear(x, weight[modality if num_routers > 1 else 0])
        else:
            logits = F.linear(x, weight.view(num_routers * num_experts, dim))
            if num_routers > 1:
                logits = logits.view(-1, num_routers, num_experts)  # (T, M, E)
                logits = logits.gather(1, modality.view(-1, 1, 1).expand(-1, 1, num_experts)).squeeze(1)
        blocked = self.blocked(logits.device)
        if blocked is not None:
            logits = logits.masked_fill(blocked[modality], float("-inf"))
        return logits  # (T, E)

    def forward(self, x: Tensor, modality: Tensor | int, sequences: int = 1) -> RouterOutput:
        """``sequences``: how many equal sequences the ``T`` positions hold, back to back."""
        # Autocast would run the logits' matmul in bf16/fp16: routing, aux losses and statistics
        # come from float32 under it too.
        with autocast_off(x.device.type):
            logits = self.logits(x, modality)
            probs = logits.softmax(dim=-1)
            weights, indices = self.select(probs, sequences)
        return RouterOutput(logits, probs, weights, indices)

    @abstractmethod
    def select(self, probs: Tensor, sequences: int) -> tuple[Tensor, Tensor]:
        """Routing weights and indices from the ``(T, E)`` probabilities (token choice routes each
        position on its own and needs no ``sequences``)."""

    @abstractmethod
    def dispatch(self, router_out: RouterOutput) -> tuple[Dispatch, Tensor, Tensor, Tensor]:
        """Group assignments by expert.

        Returns the dispatch; the position and the expert of every assignment made before any
        capacity drop (for load statistics); and the position of every dropped assignment.
        """


class TokenChoiceRouter(Router):
    def select(self, probs: Tensor, sequences: int) -> tuple[Tensor, Tensor]:
        weights, indices = probs.topk(self.config.top_k, dim=-1)  # (T, k)
        if self.config.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, indices

    def dispatch(self, router_out: RouterOutput) -> tuple[Dispatch, Tensor, Tensor, Tensor]:
        num_tokens, k = router_out.indices.shape
        # Slot-major order: with a capacity limit, first choices win over second choices.
        experts = router_out.indices.t().reshape(-1)  # (k*T,)
        weights = router_out.weights.t().reshape(-1)
        order = experts.argsort(stable=True)
        counts = count(experts, self.num_experts)
        token_idx = order % num_tokens
        weights = weights[order]
        positions = torch.arange(k * num_tokens, device=experts.device) % num_tokens  # slot-major, as experts
        dropped = token_idx[:0]
        if self.config.capacity_factor is not None:
            capacity = math.ceil(self.config.capacity_factor * num_tokens * k / self.num_experts)
            starts = counts.cumsum(0) - counts
            rank = torch.arange(order.numel(), device=order.device) - starts.repeat_interleave(
                counts, output_size=order.numel()
            )
            keep = rank < capacity
            dropped = token_idx[~keep]
            token_idx, weights = token_idx[keep], weights[keep]
            counts = counts.clamp(max=capacity)
        dispatch = Dispatch(token_idx, weights, counts)
        return dispatch, positions, experts, dropped


class ExpertChoiceRouter(Router):
    def capacity(self, num_tokens: int) -> int:
        """Positions each expert picks in a sequence of ``num_tokens``."""
        factor = self.config.capacity_factor or 1.0
        return min(num_tokens, math.ceil(factor * num_tokens * self.config.top_k / self.num_experts))

    def select(self, probs: Tensor, sequences: int) -> tuple[Tensor, Tensor]:
        num_tokens, num_experts = probs.shape
        length = num_tokens // sequences
        per_sequence = probs.view(sequences, length, num_experts).transpose(1, 2)  # (S, E, L)
        weights, indices = per_sequence.topk(self.capacity(length), dim=-1)  # (S, E, C)
        indices = indices + length * torch.arange(sequences, device=indices.device).view(-1, 1, 1)  # positions in T
        to_experts = lambda t: t.transpose(0, 1).reshape(num_experts, -1)  # noqa: E731  (S, E, C) -> (E, S*C)
        return to_experts(weights), to_experts(indices)

    def dispatch(self, router_out: RouterOutput) -> tuple[Dispatch, Tensor, Tensor, Tensor]:
        num_experts, capacity = router_out.indices.shape
        experts = torch.arange(num_experts, device=router_out.indices.device).repeat_interleave(capacity)
        token_idx = router_out.indices.reshape(-1)
        weights = router_out.weights.reshape(-1)
        # A blocked (partitioned) expert may have had to pick positions with zero probability.
        keep = weights > 0
        token_idx, weights, experts = token_idx[keep], weights[keep], experts[keep]
        return Dispatch(token_idx, weights, count(experts, num_experts)), token_idx, experts, token_idx[:0]


def build_router(in_features: int, config: MoEConfig, causal: bool, device=None, dtype=None) -> Router:
    if causal:
        _check_causal(config)
    if config.router == "expert_choice":
        return ExpertChoiceRouter(in_features, config, device=device, dtype=dtype)
    return TokenChoiceRouter(in_features, config, device=device, dtype=dtype)


def _check_causal(config: MoEConfig) -> None:
    """A causal layer's routing of a position may depend on no later position."""
    if config.router == "expert_choice":
        raise ValueError(
            "moe.router='expert_choice' is not allowed in a causal layer: each expert would pick "
            "positions by looking at future tokens. Use 'token_choice' for decoder layers."
        )
    if config.capacity_factor is not None:
        raise ValueError(
            f"moe.capacity_factor={config.capacity_factor} is not allowed in a causal layer: a later token's "
            "choice could drop an earlier token's assignment, and capacity at decoding (one token per "
            "sequence) differs from training. Use moe.capacity_factor=None (dropless) for decoder layers "
            "and layers shared with the decoder."
        )
