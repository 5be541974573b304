"""The sparse MoE layer: router -> experts (+ optional always-on shared experts).

Notable choices:
- The constructor takes timm's MLP contract (``in_features, hidden_features, out_features,
  act_layer, norm_layer, bias, drop, device, dtype``) plus ``config`` and ``causal``, so a
  timm ``Block(mlp_layer=partial(MoELayer, config=...))`` builds it, and it replaces a
  transformers MLP module as it is (``forward(x) -> x``-shaped tensor).
- ``forward(x, modality)`` returns a tensor like any MLP; ``forward_with_aux`` returns a
  ``MoEOutput`` with the aux losses and routing statistics. Inside a model, ``moe_scope``
  hands the per-position modality to every MoE layer and collects their outputs for the
  duration of one forward, then clears both: nothing outlives the call. A layer called with
  neither an explicit modality nor a scope raises: there is no silent default modality.
- Padding is not data: positions whose modality is ``PADDING`` are removed before the router,
  so no expert computes them and no loss, statistic or capacity counts them; their output is 0
  (the residual passes them through). The model marks them from the attention mask. Finding
  them reads the modality on the host: ``moe_scope`` does it once per forward for every layer of
  the tower (and not at all for a modality given as one int). Where every data position has
  one modality (an image tower, a decode step), the router scores with that modality's router
  alone, without picking each position's row.
- Host syncs: none in the grouped_mm path (CUDA), one per layer call in the per-expert walk (it
  reads the group sizes); counts use ``router.count``, not CUDA's syncing ``bincount``. On CPU,
  where a host read waits for nothing, the kernel choice also counts the experts touched.
- Batch-1 decoding on CPU: a single position goes straight to its k experts (their ids read on
  the host, ``Experts.forward_position``): no sort, gather or scatter; the layer call runs 26
  top-level ops against 43 through a dispatch (top-2, torch's profiler). A decode step's time
  goes mostly to such small ops, so the path dispatches none it can skip (a cast to the dtype a
  tensor has, eval-mode dropout). The routing statistics are then found from the router's output
  only if read.
- Aux losses: the Switch load-balancing loss (Fedus et al. 2021, eq. 4, in the top-k form
  transformers' ``load_balancing_loss_func`` uses) computed per modality over the experts the
  modality may use and averaged over the modalities present; the router z-loss
  (Zoph et al. 2022, ST-MoE eq. 5).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig
from .experts import Experts, FeedForward
from .router import Router, RouterOutput, TokenChoiceRouter, build_router, count

# The modality of a position that is not data (padding): it routes nowhere.
PADDING = -1


class computed_once:  # noqa: N801  (used as a decorator, like the property it stands for)
    """``functools.cached_property`` minus the lock it takes on Python 3.11: ``torch.compile`` cannot
    trace that lock, and ran the code reading the aux losses eagerly."""

    def __init__(self, compute):
        self.compute, self.name = compute, compute.__name__

    def __get__(self, owner, owner_type=None):
        if owner is None:
            return self
        value = owner.__dict__[self.name] = self.compute(owner)  # read from the instance from now on
        return value


class MoEOutput:
    """What one MoE layer returns for one call. Losses and statistics are computed when first
    read (decoding reads none of them); statistics are detached, losses are not.

    Everything but ``hidden_states`` covers the data positions only (padding excluded).

    Attributes:
        hidden_states: the layer output, shaped like the input (0 at padding positions).
        router_logits: ``(T, E)`` float32, ``T`` the data positions in input order.
        load_balance_loss: scalar, averaged over the modalities present (0 for expert choice,
            which balances load by construction).
        z_loss: scalar router z-loss.
        load: ``(M, E)`` fraction of each modality's assignments that went to each expert.
        load_balance: ``(M,)`` the load-balancing loss of each modality (0 where absent).
        entropy: ``(M,)`` mean router entropy (nats) over each modality's positions.
        dropped: ``(M,)`` fraction of each modality's assignments dropped over capacity.
        tokens: ``(M,)`` positions of each modality.
    """

    def __init__(
        self, hidden_states: Tensor, router: Router, router_out: RouterOutput, modality: Tensor,
        assignments: tuple[Tensor, Tensor, Tensor] | None = None,
    ):
        """``assignments``: the router's ``dispatch`` minus the dispatch itself (position and expert
        of every assignment, dropped positions); found from ``router_out`` when first read if None."""
        self.hidden_states = hidden_states
        self.router_logits = router_out.logits
        self._probs = router_out.probs
        self._router, self._router_out, self._modality = router, router_out, modality
        self._given_assignments = assignments
        self._config, self._token_choice = router.config, isinstance(router, TokenChoiceRouter)

    @computed_once
    def _assignments(self) -> tuple[Tensor, Tensor, Tensor]:
        return self._given_assignments or self._router.dispatch(self._router_out)[1:]

    @computed_once
    def tokens(self) -> Tensor:
        return count(self._modality, self._config.num_modalities)  # (M,)

    @computed_once
    def _counts(self) -> Tensor:
        """``(M, E)`` assignments before drops."""
        m, e = self._config.num_modalities, self._config.num_experts
        positions, experts, _ = self._assignments
        index = self._modality[positions] * e + experts
        return count(index, m * e).view(m, e).float()

    def _per_modality_mean(self, values: Tensor) -> Tensor:
        """Mean of per-position ``values`` over each modality's positions."""
        sums = values.new_zeros((self._config.num_modalities,) + values.shape[1:]).index_add_(0, self._modality, values)
        return sums / self.tokens.clamp(min=1).view(-1, *([1] * (values.dim() - 1)))

    @computed_once
    def load_balance(self) -> Tensor:
        if not self._token_choice:
            return self._probs.new_zeros(self._config.num_modalities)
        allowed = torch.tensor(self._config.allowed_experts(), device=self._probs.device).sum(-1)  # (M,)
        fraction = self._counts / self.tokens.clamp(min=1).unsqueeze(-1)
        return allowed * (fraction * self._per_modality_mean(self._probs)).sum(-1)  # (M,)

    @computed_once
    def load_balance_loss(self) -> Tensor:
        if not self._token_choice:
            return self._probs.new_zeros(())
        present = (self.tokens > 0).to(self.load_balance.dtype)  # a mask, not an index: no host sync
        return (self.load_balance * present).sum() / present.sum().clamp(min=1)  # 0 for a call of padding only

    @computed_once
    def z_loss(self) -> Tensor:
        # The mean over the data positions, 0 where there are none (a call of padding only).
        return torch.logsumexp(self.router_logits, dim=-1).square().sum() / max(self.router_logits.shape[0], 1)

    @computed_once
    def load(self) -> Tensor:
        return (self._counts / self._counts.sum(-1, keepdim=True).clamp(min=1)).detach()

    @computed_once
    def entropy(self) -> Tensor:
        return self._per_modality_mean(torch.special.entr(self._probs.detach()).sum(-1))

    @computed_once
    def dropped(self) -> Tensor:
        dropped = count(self._modality[self._assignments[2]], self._config.num_modalities).float()
        return dropped / self._counts.sum(-1).clamp(min=1)


class Modality(NamedTuple):
    """The modality of a layer call's positions, resolved on the host (once per ``moe_scope`` and shape).

    Attributes:
        per_position: ``(T_data,)`` the modality of each data position.
        data: the data positions' indices among all ``T`` (None when every position is data).
        single: the one modality of every data position, where there is one (None otherwise): the
            router then scores them with that modality's router alone, no per-position gather.
    """

    per_position: Tensor
    data: Tensor | None
    single: int | None


def flat_modality(modality: Tensor | int, lead_shape: torch.Size, device: torch.device) -> Modality:
    """The ``Modality`` of the positions of ``lead_shape``. A tensor costs one host sync (which
    modalities occur, padding included) and one more where there is padding (finding it); one int
    for all positions costs none."""
    if not isinstance(modality, Tensor):
        flat = torch.full((lead_shape.numel(),), int(modality), dtype=torch.long, device=device)
        return Modality(flat, None, int(modality)) if modality != PADDING else Modality(flat[:0], flat[:0], None)
    flat = modality.to(device=device, dtype=torch.long).expand(lead_shape).reshape(-1)  # (T,)
    values, data = flat.unique().tolist(), None  # the sync
    if PADDING in values:
        values.remove(PADDING)
        data = (flat != PADDING).nonzero().squeeze(1)
        flat = flat[data]
    return Modality(flat, data, values[0] if len(values) == 1 else None)


class ScopeModality:
    """A ``moe_scope``'s modality, resolved once per input shape and device and reused by every
    layer of the forward: the tower's padding is looked up once, not in every layer."""

    def __init__(self, modality: Tensor | int):
        self.modality = modality
        self._resolved: dict[tuple, Modality] = {}

    def resolve(self, lead_shape: torch.Size, device: torch.device) -> Modality:
        key = (tuple(lead_shape), device)
        if key not in self._resolved:
            self._resolved[key] = flat_modality(self.modality, lead_shape, device)
        return self._resolved[key]


# Activation modules by class name: torch's and transformers' (ACT2FN) spellings.
_ACTIVATION_BY_CLASS = {
    "SiLU": "silu", "SiLUActivation": "silu",
    "GELUActivation": "gelu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
}


def _activation_name(act) -> str:
    """The expert activation matching a torch/transformers activation module, class or partial."""
    if not isinstance(act, nn.Module):
        act = act()
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    name = _ACTIVATION_BY_CLASS.get(type(act).__name__)
    if name is None:
        raise ValueError(f"act_layer={type(act).__name__}: MoE experts support GELU (exact or tanh) and SiLU")
    return name


class MoELayer(nn.Module):
    """A drop-in replacement for a transformer MLP whose router picks experts per position."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer=None,
        norm_layer=None,
        bias: bool | None = None,
        drop: float = 0.0,
        *,
        config: MoEConfig | None = None,
        causal: bool = False,
        activation: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if norm_layer is not None:
            raise ValueError("norm_layer: MoELayer has no norm inside the MLP; build the block without it")
        config = config or MoEConfig()
        dd = {"device": device, "dtype": dtype}
        hidden_features = hidden_features or 4 * in_features
        out_features = out_features or in_features
        if activation is None and act_layer is not None and config.expert_type == "gelu":
            activation = _activation_name(act_layer)
        self.config = config
        self.causal = causal
        self.router = build_router(in_features, config, causal, **dd)
        self.experts = Experts(
            config.num_experts, in_features, hidden_features, out_features, config.expert_type,
            bias=bias, activation=activation, implementation=config.implementation, **dd,
        )
        self.shared_experts = None
        if config.num_shared_experts:
            self.shared_experts = FeedForward(
                in_features, hidden_features * config.num_shared_experts, out_features, config.expert_type,
                bias=bias, activation=self.experts.activation, **dd,
            )
        self.drop = nn.Dropout(drop)
        self._scope: tuple[ScopeModality, list[MoEOutput]] | None = None

    def forward(self, x: Tensor, modality: Tensor | int | None = None) -> Tensor:
        out = self.forward_with_aux(x, modality)
        if self._scope is not None:
            self._scope[1].append(out)
        return out.hidden_states

    def forward_with_aux(self, x: Tensor, modality: Tensor | int | None = None) -> MoEOutput:
        """``x``: ``(..., D)``; ``modality``: ints broadcastable to ``x.shape[:-1]`` (``PADDING``
        where a position is not data). Required unless a ``moe_scope`` gives it.

        Expert choice picks within each sequence (``x.shape[-2]`` positions), so an
        image's routing does not depend on its batch-mates.
        """
        if x.is_meta:
            raise ValueError("MoELayer on the meta device: routing reads values (the experts each position goes to), "
                             "which meta tensors do not hold; run a MoE model's forward on a real device")
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        modality, data, single = self._modality(modality, shape[:-1], x.device)  # (T_data,)
        if data is not None:
            if not isinstance(self.router, TokenChoiceRouter):
                # Expert choice ranks whole sequences; removing padding would mix them.
                raise ValueError("moe.router='expert_choice' takes no padding positions (modality PADDING)")
            x = x.index_select(0, data)  # (T_data, D)
        sequences = math.prod(shape[:-2])  # expert choice ranks within each (never padded) sequence
        router_out = self.router(x, modality if single is None else single, sequences)
        assignments = None  # one position: found from router_out only if statistics are read
        if self._goes_straight(x):
            y = self.experts.forward_position(x, router_out.weights, router_out.indices)
        else:
            dispatch, positions, experts, dropped = self.router.dispatch(router_out)
            assignments = (positions, experts, dropped)
            y = self.experts(x, dispatch)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if data is not None:
            y = y.new_zeros(shape[:-1].numel(), y.shape[-1]).index_copy(0, data, y)  # (T, D_out), 0 at padding
        if self.training and self.drop.p > 0:  # nn.Dropout is the identity otherwise: a module call saved
            y = self.drop(y)
        y = y.view(*shape[:-1], -1)
        return MoEOutput(y, self.router, router_out, modality, assignments)

    def _goes_straight(self, x: Tensor) -> bool:
        """Whether one position goes straight to its experts (CPU batch-1 decoding), without a dispatch."""
        token_choice = isinstance(self.router, TokenChoiceRouter)
        return x.shape[0] == 1 and x.device.type == "cpu" and token_choice and self.experts.implementation == "grouped"

    def _modality(self, modality: Tensor | int | None, lead_shape: torch.Size, device: torch.device) -> Modality:
        """The positions' ``Modality`` (``flat_modality``), from the scope if it gives them."""
        if modality is None and self._scope is not None:
            return self._scope[0].resolve(lead_shape, device)
        if modality is None:
            raise ValueError(
                "MoELayer needs each position's modality: call it as layer(x, modality) or inside "
                "moe_scope(model, modality)"
            )
        return flat_modality(modality, lead_shape, device)

    def aux_loss(self, out: MoEOutput) -> Tensor:
        """The weighted aux loss this layer adds to the training loss."""
        return self.config.aux_loss_weight * out.load_balance_loss + self.config.z_loss_weight * out.z_loss

    @classmethod
    def from_dense(
        cls, mlp: nn.Module, config: MoEConfig, causal: bool = False, noise_std: float = 0.0
    ) -> "MoELayer":
        """Upcycle a dense MLP: every expert starts as a copy of it.

        Accepts a timm ``Mlp`` (GELU experts), a transformers Llama-style MLP
        (``gate_proj``/``up_proj``/``down_proj``, SwiGLU experts) or a ``FeedForward``; the
        expert type follows the dense MLP. Shared experts start at zero output. With token
        choice, renormalised top-k and no capacity drops, the new layer computes exactly what
        ``mlp`` did until ``noise_std`` (relative Gaussian noise per expert) or training moves it.
        """
        fc_in_w, fc_in_b, fc_out_w, fc_out_b, expert_type, activation = dense_weights(mlp)
        config = dataclasses.replace(config, expert_type=expert_type)
        layer = cls(
            fc_in_w.shape[1], fc_out_w.shape[1], fc_out_w.shape[0], bias=fc_in_b is not None, config=config,
            causal=causal, activation=activation, device=fc_in_w.device, dtype=fc_in_w.dtype,
        )
        with torch.no_grad():
            pairs = [(layer.experts.in_proj, fc_in_w), (layer.experts.out_proj, fc_out_w)]
            if fc_in_b is not None:
                pairs += [(layer.experts.in_bias, fc_in_b), (layer.experts.out_bias, fc_out_b)]
            for param, dense in pairs:
                param.copy_(dense.unsqueeze(0).expand_as(param))
                if noise_std > 0:
                    param.add_(torch.randn_like(param) * noise_std * dense.std())
            if layer.shared_experts is not None:
                nn.init.zeros_(layer.shared_experts.fc_out.weight)
                if layer.shared_experts.fc_out.bias is not None:
                    nn.init.zeros_(layer.shared_experts.fc_out.bias)
        return layer


def dense_weights(mlp: nn.Module):
    """``(in_w, in_b, out_w, out_b, expert_type, activation)`` of a supported dense MLP."""
    if isinstance(mlp, FeedForward):
        expert_type = "swiglu" if mlp.gated else "gelu"
        return (mlp.fc_in.weight, mlp.fc_in.bias, mlp.fc_out.weight, mlp.fc_out.bias, expert_type, mlp.activation)
    if all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
        activation = _activation_name(getattr(mlp, "act_fn", nn.SiLU()))
        in_w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
        in_b = None
        if mlp.gate_proj.bias is not None:
            in_b = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias], dim=0)
        return in_w, in_b, mlp.down_proj.weight, mlp.down_proj.bias, "swiglu", activation
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2") and isinstance(mlp.fc1, nn.Linear):
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise ValueError(f"cannot upcycle {type(mlp).__name__}: it has a norm inside the MLP")
        return mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, "gelu", _activation_name(mlp.act)
    raise ValueError(
        f"cannot upcycle {type(mlp).__name__}: expected a timm Mlp (fc1/act/fc2), a Llama-style MLP "
        "(gate_proj/up_proj/down_proj) or a vlmoe FeedForward"
    )


class SharedMoE(nn.Module):
    """Calls a MoE layer owned elsewhere; holding it in a tuple keeps it out of this module's state."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self._target = (layer,)

    @property
    def layer(self) -> MoELayer:
        return self._target[0]

    def forward(self, x: Tensor, modality: Tensor | int | None = None) -> Tensor:
        return self.layer(x, modality)


def moe_layers_of(module: nn.Module) -> list[MoELayer]:
    """Every MoE layer a module calls, shared ones included, each once."""
    found = {}
    for m in module.modules():
        layer = m.layer if isinstance(m, SharedMoE) else m
        if isinstance(layer, MoELayer):
            found[id(layer)] = layer
    return list(found.values())


@contextmanager
def moe_scope(module: nn.Module, modality: Tensor | int) -> Iterator[list[MoEOutput]]:
    """Give every MoE layer inside ``module`` this modality and collect their outputs.

    ``modality`` must broadcast to the leading shape of the inputs those layers see (``PADDING``
    marks positions that are not data). Yields the list the layers append their ``MoEOutput``
    to, in call order. Restores the previous scope on exit, so scopes nest. The data positions
    are found once for the whole scope (``ScopeModality``), not once per layer.
    """
    layers = moe_layers_of(module)
    records: list[MoEOutput] = []
    previous = [layer._scope for layer in layers]
    shared = ScopeModality(modality)
    for layer in layers:
        layer._scope = (shared, records)
    try:
        yield records
    finally:
        for layer, scope in zip(layers, previous):
            layer._scope = scope
