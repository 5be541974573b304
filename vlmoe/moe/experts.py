"""Expert feed-forward networks stored as 3-D parameters ``[E, ...]``.

Notable choices:
- One weight layout for both expert types, as ``nn.Linear`` stores it: ``in_proj`` is
  ``(E, G*H, D_in)`` (G = 2 for gated experts, rows ``[gate; value]``) and ``out_proj`` is
  ``(E, D_out, H)``. Upcycling a dense MLP is then a copy into every expert.
- Two implementations behind one switch: ``loop`` is the obviously correct reference (plain
  autograd, one expert at a time); ``grouped`` is one fused autograd function.
- NOTE on the grouped kernel:
  1. Assignments arrive sorted by expert, so each expert's rows are one contiguous slice and
     every matmul is a plain GEMM on a slice, written in place with ``out=``.
  2. Backward is written by hand: each expert's weight gradient lands directly in its slice
     of one preallocated ``[E, ...]`` buffer. Indexing the 3-D weight inside autograd would
     allocate a full-size gradient per expert.
  3. Gather and scatter happen once each way (``index_select`` / ``index_add_``); routing
     weights are applied to the expert output rows, and their gradient is ``<dy, y>``.
  4. On CUDA the per-expert GEMMs go through ``torch.nn.functional.grouped_mm`` (one kernel
     launch) where the installed torch has it; on CPU a GEMM per expert is as fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXPERT_ACTIVATIONS = {
    "silu": (F.silu, torch.ops.aten.silu_backward),
    "gelu": (F.gelu, lambda grad, x: torch.ops.aten.gelu_backward(grad, x, approximate="none")),
    "gelu_tanh": (
        lambda x: F.gelu(x, approximate="tanh"),
        lambda grad, x: torch.ops.aten.gelu_backward(grad, x, approximate="tanh"),
    ),
}
DEFAULT_ACTIVATION = {"swiglu": "silu", "gelu": "gelu"}


@dataclass
class Dispatch:
    """Which positions each expert processes, grouped by expert.

    Attributes:
        token_idx: ``(N,)`` position of each assignment, experts' groups back to back.
        weights: ``(N,)`` routing weight of each assignment.
        group_sizes: assignments per expert (length E), a plain list: the kernels slice on it.
    """

    token_idx: Tensor
    weights: Tensor
    group_sizes: list[int]


def _check_activation(name: str) -> None:
    if name not in EXPERT_ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not one of {list(EXPERT_ACTIVATIONS)}")


class FeedForward(nn.Module):
    """A dense MLP of either expert type: the shared expert, the dense baseline, the reference."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        expert_type: str = "swiglu",
        bias: bool | None = None,
        activation: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        bias = expert_type == "gelu" if bias is None else bias
        self.gated = expert_type == "swiglu"
        self.activation = activation or DEFAULT_ACTIVATION[expert_type]
        _check_activation(self.activation)
        self.fc_in = nn.Linear(in_features, hidden_features * (2 if self.gated else 1), bias=bias, **dd)
        self.fc_out = nn.Linear(hidden_features, out_features, bias=bias, **dd)

    def forward(self, x: Tensor) -> Tensor:
        act = EXPERT_ACTIVATIONS[self.activation][0]
        h = self.fc_in(x)
        if self.gated:
            gate, value = h.chunk(2, dim=-1)
            return self.fc_out(act(gate) * value)
        return self.fc_out(act(h))


class Experts(nn.Module):
    """``num_experts`` feed-forward networks evaluated on the assignments of a ``Dispatch``."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        expert_type: str = "swiglu",
        bias: bool | None = None,
        activation: str | None = None,
        implementation: str = "grouped",
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if expert_type not in DEFAULT_ACTIVATION:
            raise ValueError(f"expert_type={expert_type!r} is not one of {list(DEFAULT_ACTIVATION)}")
        out_features = out_features or in_features
        bias = expert_type == "gelu" if bias is None else bias
        self.num_experts = num_experts
        self.hidden_features = hidden_features
        self.gated = expert_type == "swiglu"
        self.activation = activation or DEFAULT_ACTIVATION[expert_type]
        _check_activation(self.activation)
        self.implementation = implementation
        width = hidden_features * (2 if self.gated else 1)
        self.in_proj = nn.Parameter(torch.empty(num_experts, width, in_features, **dd))
        self.out_proj = nn.Parameter(torch.empty(num_experts, out_features, hidden_features, **dd))
        self.in_bias = nn.Parameter(torch.empty(num_experts, width, **dd)) if bias else None
        self.out_bias = nn.Parameter(torch.empty(num_experts, out_features, **dd)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The same distribution as nn.Linear, expert by expert.
        for weight, bias in ((self.in_proj, self.in_bias), (self.out_proj, self.out_bias)):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def forward(self, x: Tensor, dispatch: Dispatch) -> Tensor:
        """``x``: ``(T, D_in)``. Returns ``(T, D_out)``: each position's weighted sum of expert outputs."""
        if self.implementation == "loop":
            return self._forward_loop(x, dispatch)
        if self.implementation == "grouped":
            return GroupedExpertsFunction.apply(
                x, dispatch.weights.to(x.dtype), dispatch.token_idx, dispatch.group_sizes,
                self.in_proj, self.in_bias, self.out_proj, self.out_bias, self.gated, self.activation,
            )
        raise ValueError(f"implementation={self.implementation!r} is not one of ['grouped', 'loop']")

    def _forward_loop(self, x: Tensor, dispatch: Dispatch) -> Tensor:
        act = EXPERT_ACTIVATIONS[self.activation][0]
        out = x.new_zeros(x.shape[0], self.out_proj.shape[1])
        start = 0
        for e, size in enumerate(dispatch.group_sizes):
            if size == 0:
                continue
            rows = dispatch.token_idx[start : start + size]
            h = F.linear(x[rows], self.in_proj[e], None if self.in_bias is None else self.in_bias[e])
            if self.gated:
                gate, value = h.chunk(2, dim=-1)
                h = act(gate) * value
            else:
                h = act(h)
            y = F.linear(h, self.out_proj[e], None if self.out_bias is None else self.out_bias[e])
            out = out.index_add(0, rows, y * dispatch.weights[start : start + size, None].to(y.dtype))
            start += size
        return out

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in={self.in_proj.shape[-1]}, hidden={self.hidden_features}, "
            f"out={self.out_proj.shape[1]}, gated={self.gated}, activation={self.activation}, "
            f"implementation={self.implementation}"
        )


def _grouped_mm_available(device: torch.device) -> bool:
    return device.type == "cuda" and hasattr(F, "grouped_mm")


def _grouped_mm_accepts(x: Tensor, *weights: Tensor) -> bool:
    """``F.grouped_mm`` takes float32/bf16/fp16 with every row a multiple of 16 bytes."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return all(w.shape[-1] * w.element_size() % 16 == 0 and w.shape[-2] * w.element_size() % 16 == 0 for w in weights)


def _grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, sizes: list[int], offsets: Tensor | None) -> Tensor:
    """Rows of ``x`` grouped by expert times each expert's ``weight[e].T``: ``(N, in) -> (N, out)``."""
    if offsets is not None:
        out = F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)
        if bias is not None:
            out += bias.repeat_interleave(torch.tensor(sizes, device=x.device), dim=0)
        return out
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, size in enumerate(sizes):
        if size:
            rows = slice(start, start + size)
            if bias is None:
                torch.mm(x[rows], weight[e].t(), out=out[rows])
            else:
                torch.addmm(bias[e], x[rows], weight[e].t(), out=out[rows])
        start += size
    return out


def _grouped_backward(
    grad: Tensor, inputs: Tensor, weight: Tensor, has_bias: bool, sizes: list[int], need_input_grad: bool = True
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """Gradients of ``_grouped_linear`` for the input rows, the weight and the bias."""
    grad_input = grad.new_empty(grad.shape[0], weight.shape[2]) if need_input_grad else None
    grad_weight = torch.empty_like(weight)
    grad_bias = grad.new_empty(weight.shape[0], weight.shape[1]) if has_bias else None
    start = 0
    for e, size in enumerate(sizes):
        rows = slice(start, start + size)
        start += size
        if size == 0:
            grad_weight[e].zero_()
            if grad_bias is not None:
                grad_bias[e].zero_()
            continue
        torch.mm(grad[rows].t(), inputs[rows], out=grad_weight[e])
        if grad_input is not None:
            torch.mm(grad[rows], weight[e], out=grad_input[rows])
        if grad_bias is not None:
            torch.sum(grad[rows], dim=0, out=grad_bias[e])
    return grad_input, grad_weight, grad_bias


class GroupedExpertsFunction(torch.autograd.Function):
    """Fused gather -> expert FFNs -> weighted scatter-add, with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, weights, token_idx, sizes, in_proj, in_bias, out_proj, out_bias, gated, activation):
        act = EXPERT_ACTIVATIONS[activation][0]
        offsets = None
        if _grouped_mm_available(x.device) and _grouped_mm_accepts(x, in_proj, out_proj):
            offsets = torch.tensor(sizes, device=x.device).cumsum(0).to(torch.int32)
        xs = x.index_select(0, token_idx)  # (N, D_in)
        h = _grouped_linear(xs, in_proj, in_bias, sizes, offsets)  # (N, G*H)
        if gated:
            gate, value = h.chunk(2, dim=-1)
            act_gate = act(gate)
            a = act_gate * value  # (N, H)
        else:
            act_gate = None
            a = act(h)
        y = _grouped_linear(a, out_proj, out_bias, sizes, offsets)  # (N, D_out)
        out = x.new_zeros(x.shape[0], y.shape[1]).index_add_(0, token_idx, y * weights[:, None])
        ctx.save_for_backward(xs, h, act_gate, a, y, weights, token_idx, in_proj, out_proj)
        ctx.meta = (sizes, gated, activation, in_bias is not None, out_bias is not None, x.shape[0])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, h, act_gate, a, y, weights, token_idx, in_proj, out_proj = ctx.saved_tensors
        sizes, gated, activation, has_in_bias, has_out_bias, num_tokens = ctx.meta
        act_backward = EXPERT_ACTIVATIONS[activation][1]
        gy = grad_out.index_select(0, token_idx)  # (N, D_out)
        grad_weights = (gy * y).sum(-1) if ctx.needs_input_grad[1] else None
        gy *= weights[:, None]
        ga, grad_out_proj, grad_out_bias = _grouped_backward(gy, a, out_proj, has_out_bias, sizes)
        if gated:
            gate, value = h.chunk(2, dim=-1)
            gh = torch.empty_like(h)
            grad_gate, grad_value = gh.chunk(2, dim=-1)
            torch.mul(ga, act_gate, out=grad_value)
            grad_gate.copy_(act_backward(ga * value, gate))
        else:
            gh = act_backward(ga, h)
        need_x = ctx.needs_input_grad[0]
        gxs, grad_in_proj, grad_in_bias = _grouped_backward(gh, xs, in_proj, has_in_bias, sizes, need_x)
        grad_x = None
        if need_x:
            grad_x = gxs.new_zeros(num_tokens, gxs.shape[1]).index_add_(0, token_idx, gxs)
        return grad_x, grad_weights, None, None, grad_in_proj, grad_in_bias, grad_out_proj, grad_out_bias, None, None
