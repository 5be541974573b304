"""Configuration of one sparse MoE layer.

Validation lives in ``__post_init__`` and raises ``ValueError`` naming the field, so a bad
value is caught where it is written (a YAML file, a command-line override, a test), not
deep inside a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROUTERS = ("token_choice", "expert_choice")
MODALITY_MODES = ("shared", "per_modality", "partitioned")
EXPERT_TYPES = ("swiglu", "gelu")
IMPLEMENTATIONS = ("grouped", "loop")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"moe.{name}={value!r} is not one of {list(allowed)}")


@dataclass
class MoEConfig:
    """How a MoE layer routes and computes.

    Attributes:
        num_experts: routed experts in the pool.
        top_k: experts per position (token choice), or the average per position that sets
            each expert's capacity (expert choice).
        router: ``token_choice`` (each position picks its top-k experts) or ``expert_choice``
            (each expert picks its top positions in each sequence; only in non-causal layers).
        normalize_top_k: renormalise the top-k probabilities to sum to one. At ``top_k=1`` the one
            weight is then always 1 and the router learns from the load-balancing and z-losses
            alone, not from the task; Switch-style top-1 routing (weight = the probability) sets
            it false.
        jitter_noise: multiplicative uniform noise on the router input while training.
        modality_mode: ``shared`` (one router for all modalities), ``per_modality`` (one router
            per modality over the same experts) or ``partitioned`` (experts reserved per
            modality, the rest open to all, enforced by masking router logits).
        num_modalities: modalities the layer distinguishes (0 = image patch, 1 = text token).
        experts_per_modality: in ``partitioned`` mode, how many experts each modality reserves
            (experts ``[0, n0)`` for modality 0, the next ``n1`` for modality 1, ...); the
            remaining experts are open to every modality.
        num_shared_experts: always-on experts (one dense MLP of this many expert widths).
        expert_type: ``swiglu`` (gated SiLU, no bias) or ``gelu`` (two-layer GELU MLP with bias).
        capacity_factor: ``None`` for dropless; otherwise each expert takes at most
            ``ceil(capacity_factor * assignments / num_experts)`` assignments (expert choice:
            per sequence). Only in non-causal layers: causal (decoder) layers refuse it.
        implementation: ``grouped`` (fused grouped kernel) or ``loop`` (the reference).
        aux_loss_weight: weight of the load-balancing loss in the training loss.
        z_loss_weight: weight of the router z-loss.
    """

    num_experts: int = 8
    top_k: int = 2
    router: str = "token_choice"
    normalize_top_k: bool = True
    jitter_noise: float = 0.0
    modality_mode: str = "shared"
    num_modalities: int = 2
    experts_per_modality: list[int] = field(default_factory=list)
    num_shared_experts: int = 0
    expert_type: str = "swiglu"
    capacity_factor: float | None = None
    implementation: str = "grouped"
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001

    def __post_init__(self) -> None:
        _choice("router", self.router, ROUTERS)
        _choice("modality_mode", self.modality_mode, MODALITY_MODES)
        _choice("expert_type", self.expert_type, EXPERT_TYPES)
        _choice("implementation", self.implementation, IMPLEMENTATIONS)
        if self.num_experts < 1:
            raise ValueError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.num_modalities < 1:
            raise ValueError(f"moe.num_modalities must be >= 1, got {self.num_modalities}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"moe.capacity_factor must be > 0 (or None for dropless), got {self.capacity_factor}")
        if self.num_shared_experts < 0:
            raise ValueError(f"moe.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        for name in ("jitter_noise", "aux_loss_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"moe.{name} must be >= 0, got {getattr(self, name)}")
        self.experts_per_modality = list(self.experts_per_modality)
        if self.modality_mode == "partitioned":
            self._check_partition()
        elif self.experts_per_modality:
            raise ValueError("moe.experts_per_modality is only used with modality_mode='partitioned'")

    def _check_partition(self) -> None:
        reserved = self.experts_per_modality
        if len(reserved) != self.num_modalities:
            raise ValueError(
                f"moe.experts_per_modality needs one count per modality ({self.num_modalities}), got {reserved}"
            )
        if any(n < 0 for n in reserved) or sum(reserved) > self.num_experts:
            raise ValueError(
                f"moe.experts_per_modality={reserved} must be non-negative and sum to at most "
                f"num_experts={self.num_experts}"
            )
        open_to_all = self.num_experts - sum(reserved)
        for m, n in enumerate(reserved):
            if self.router == "token_choice" and n + open_to_all < self.top_k:
                raise ValueError(
                    f"moe.experts_per_modality: modality {m} may use {n + open_to_all} experts, "
                    f"fewer than top_k={self.top_k}"
                )

    def allowed_experts(self) -> list[list[bool]]:
        """For each modality, which experts it may use (all of them unless partitioned)."""
        allowed = [[True] * self.num_experts for _ in range(self.num_modalities)]
        if self.modality_mode != "partitioned":
            return allowed
        start = 0
        for m, n in enumerate(self.experts_per_modality):
            for other in range(self.num_modalities):
                if other != m:
                    allowed[other][start : start + n] = [False] * n
            start += n
        return allowed
