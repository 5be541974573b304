"""Expert feed-forward networks stored as 3-D parameters ``[E, ...]``.

Notable choices:
- One weight layout for both expert types, as ``nn.Linear`` stores it: ``in_proj`` is
  ``(E, G*H, D_in)`` (G = 2 for gated experts, rows ``[gate; value]``) and ``out_proj`` is
  ``(E, D_out, H)``. Upcycling a dense MLP is then a copy into every expert.
- Two implementations behind one switch: ``loop`` is the obviously correct reference (plain
  autograd, one expert at a time); ``grouped`` is one fused autograd function.
- NOTE on the grouped kernel:
  1. Assignments arrive sorted by expert, so each expert's rows are one contiguous slice and
     every matmul is a plain GEMM on that expert's rows.
  2. Backward is written by hand: each expert's weight gradient lands directly in its slice
     of one preallocated ``[E, ...]`` buffer. Indexing the 3-D weight inside autograd would
     allocate a full-size gradient per expert.
  3. Rows are gathered (``index_select``) and weighted outputs scatter-added (``index_add_``) per
     chunk of consecutive blocks up to ``CHUNK_BYTES`` of input rows: at decode one gather and one
     scatter serve every expert, and a large block still gathers alone, right before its matmul.
     The routing weights' gradient is ``<dy, y>``. Without a gradient to compute (decoding), the
     kernel runs outside autograd and keeps nothing for a backward.
  4. On CPU the work goes expert by expert (``_Blocks``): each expert's intermediates are a few
     megabytes, stay in cache and are reused by the allocator, where ``(N, H)`` buffers would be
     fresh pages faulted in on every call. Each block's ``x @ W.T`` takes the faster of two forms
     (``x @ W.T`` or ``(W @ x.T).T``), measured once per process and shape class
     (``expert_linear``): which one wins depends on the BLAS, the CPU, the dtype and the rows. On
     CUDA, ``torch.nn.functional.grouped_mm`` (where the installed torch has it) runs each
     projection for all experts in one launch, with the group offsets on the device; on CPU it
     does where it measured faster than the walk (``KERNELS``).
  5. The group sizes stay on the device (``Dispatch.counts``); only the per-expert CPU walk and
     the loop read them on the host (one sync per call), the grouped_mm path never does (on CPU,
     where a host read waits for nothing, the kernel choice counts the experts touched).
  6. In bf16/fp16 on CPU, oneDNN generates a matmul kernel for every new shape (1-2 ms each) and
     an expert's row count changes every call, so each block's rows are padded with zero rows up
     to one of a few sizes (``padded_rows``: under 1/8 more rows) and its kernels are reused.
     Zero rows add nothing to the weight gradients and their outputs are dropped.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# name: (activation, backward(grad, x, out) writing the input gradient into ``out``: a gated
# expert's two halves land in one buffer, with no concatenation)
EXPERT_ACTIVATIONS = {
    "silu": (F.silu, lambda grad, x, out: torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=out)),
    "gelu": (
        F.gelu,
        lambda grad, x, out: torch.ops.aten.gelu_backward.grad_input(grad, x, approximate="none", grad_input=out),
    ),
    "gelu_tanh": (
        lambda x: F.gelu(x, approximate="tanh"),
        lambda grad, x, out: torch.ops.aten.gelu_backward.grad_input(grad, x, approximate="tanh", grad_input=out),
    ),
}
DEFAULT_ACTIVATION = {"swiglu": "silu", "gelu": "gelu"}


@dataclass
class Dispatch:
    """Which positions each expert processes, grouped by expert.

    Attributes:
        token_idx: ``(N,)`` position of each assignment, experts' groups back to back.
        weights: ``(N,)`` routing weight of each assignment.
        counts: ``(E,)`` int64 assignments per expert, on the device (``N == counts.sum()``).
    """

    token_idx: Tensor
    weights: Tensor
    counts: Tensor

    @cached_property
    def group_sizes(self) -> list[int]:
        """``counts`` on the host: one sync, for the kernels that slice per expert."""
        return self.counts.tolist()


# --------------------------------------------------------------------------------- matmul forms
# One expert block's ``x @ W.T`` has two forms. Which is faster depends on the BLAS, the CPU, the
# dtype and the shape (fp32 on one AMD EPYC: ``(W @ x.T).T`` ~3x faster up to 32 rows, slower
# from ~64), so no fixed rule: each process times both once per shape class and keeps the winner.
# ``VLMOE_EXPERT_FORM`` forces one (tests; runs that must be bitwise reproducible across processes).
# The forms round differently, so a checkpoint keeps the choices (``chosen_forms``) and a resumed
# run takes them back (``restore_forms``) instead of measuring again: the resume stays bit-exact.
FORM_ENV = "VLMOE_EXPERT_FORM"


def _rows_first(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


def _weight_first(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    x = x.contiguous()  # so that x.T is column-major, the layout this form is fast with
    out = torch.mm(weight, x.t()) if bias is None else torch.addmm(bias[:, None], weight, x.t())
    return out.t()


MATMUL_FORMS = {"rows_first": _rows_first, "weight_first": _weight_first}
# Rows gathered (and scatter-added) at once: consecutive small blocks share one gather, a large block
# gathers alone, so its rows are still in cache (a quarter of a 1 MB L2) when its matmul reads them.
CHUNK_BYTES = 256 * 1024
_chosen_forms: dict[str, str] = {}  # shape or kernel class -> form or kernel, filled by _tuned
# A CPU call's kernel: the per-expert walk (NOTE 4) or ``F.grouped_mm``, one call per projection for
# every expert. Which is faster depends on the rows per expert and on the process's memory: fp32 on
# one AMD EPYC Zen 3, the layer alone, grouped_mm was 1.3-1.9x faster up to 128 assignments and
# slower from 512, while inside the tiny model's train step (1088-1880 assignments) its forward
# took 0.67-0.84 of the walk's. So each process picks per kernel class, from the class's own calls:
# its first ``TRIAL_CALLS`` run on the two kernels in turn, each timed as it runs (``KernelTrial``),
# its backward included where one follows (a class of its own: the backward is two thirds of the
# work and can favour the other kernel); then the kernel of the lower median time is kept with the
# forms. Timing the real calls, not extra ones made for it, takes in what a separate timing missed:
# at a process's first calls grouped_mm's full-size buffers are fresh memory, and in the train step
# the backward runs long after its forward, on activations gone cold. A forced form
# (``VLMOE_EXPERT_FORM``) also fixes the walk: no trials.
KERNELS = ("walk", "grouped_mm")
TRIAL_CALLS = 16


def rows_class(rows: int) -> int:
    """``rows`` rounded up to a power of two: the rows part of a shape or kernel class."""
    return 1 << max(rows - 1, 0).bit_length()


def shape_class(x: Tensor, weight: Tensor, bias: Tensor | None) -> str:
    """Calls that share a form: rows rounded up to a power of two, the weight's shape and layout
    (a string: the choices go into checkpoints as JSON)."""
    return _shape_class_name(rows_class(x.shape[0]), weight.shape, weight.stride(), bias is not None, x.dtype, x.device.type)


@functools.lru_cache(maxsize=4096)  # called for every block's matmul: a few classes, named once each
def _shape_class_name(rows: int, shape: tuple, stride: tuple, bias: bool, dtype: torch.dtype, device: str) -> str:
    return f"rows={rows} weight={'x'.join(map(str, shape))} stride={','.join(map(str, stride))} bias={bias} {dtype} {device}"


def _time_form(form: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    MATMUL_FORMS[form](x, weight, bias)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _autotune(time_choice, choices, rounds: int = 3) -> str:
    """The choice with the lowest best-of-``rounds`` ``time_choice(choice)`` (after one warm-up each)."""
    best = dict.fromkeys(choices, math.inf)
    for _ in range(rounds + 1):  # the choices take turns, so all see the same machine state
        for choice in best:
            best[choice] = min(best[choice], time_choice(choice))
    return min(best, key=best.get)


def _tuned(key: str, time_choice, choices) -> str:
    """The cached choice for ``key``, or one measured now (``_autotune``) and cached."""
    if key not in _chosen_forms:
        _chosen_forms[key] = _autotune(time_choice, choices)
    return _chosen_forms[key]


def chosen_forms() -> dict[str, str]:
    """This process's choices so far (a checkpoint keeps them). A kernel class still on trial keeps
    the better kernel so far from now on: this process and a run resumed from the checkpoint go on
    with the same kernel."""
    for key, trials in _trials.items():
        _chosen_forms[key] = trials.best()
    _trials.clear()
    return dict(_chosen_forms)


def chosen_kernels() -> dict[str, str]:
    """The CPU kernel (``KERNELS``) each kernel class kept: ``chosen_forms()``'s kernel entries."""
    return {key: kernel for key, kernel in chosen_forms().items() if kernel in KERNELS}


def restore_forms(saved: dict[str, str]) -> None:
    """Take back the choices of ``chosen_forms()`` (the same process's, before a resume); a restored
    kernel class is not tried again."""
    known = [*MATMUL_FORMS, *KERNELS]
    unknown = sorted(set(saved.values()) - set(known))
    if unknown:
        raise ValueError(f"saved expert matmul forms {unknown} are not among {known}")
    _chosen_forms.update(saved)
    for key in saved:
        _trials.pop(key, None)


def forced_form() -> str | None:
    """The form ``VLMOE_EXPERT_FORM`` forces, if it is set."""
    forced = os.environ.get(FORM_ENV)
    if forced and forced not in MATMUL_FORMS:
        raise ValueError(f"{FORM_ENV}={forced!r} is not one of {list(MATMUL_FORMS)}")
    return forced or None


def expert_form(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> str:
    """The form ``expert_linear`` uses for these operands: forced, cached, or measured now."""
    return forced_form() or tuned_form(x, weight, bias)


def tuned_form(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> str:
    """This shape class's faster form: cached, or measured now."""
    return _tuned(shape_class(x, weight, bias), lambda form: _time_form(form, x, weight, bias), MATMUL_FORMS)


def expert_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T (+ bias)`` for one expert's rows, in this shape class's faster form."""
    return MATMUL_FORMS[expert_form(x, weight, bias)](x, weight, bias)


def padded_rows(rows: int) -> int:
    """``rows`` rounded up to a multiple of 2^(bits - 4): 8 sizes per power of two, under 1/8 more."""
    step = 1 << max(rows.bit_length() - 4, 0)
    return -(-rows // step) * step


def pads_rows(x: Tensor) -> bool:
    """Whether the CPU walk pads blocks to ``padded_rows`` (reduced precision on CPU: NOTE 6)."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def autocast_off(device_type: str):
    """A context with autocast off where it is on; nothing to enter otherwise (entering autocast costs
    ~10 us, against a decode step's few-microsecond ops)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without dispatching an op where ``t`` is in ``dtype`` already (a batch-1 decode
    step's layer call runs a few dozen small ops; each costs microseconds)."""
    return t if t.dtype == dtype else t.to(dtype)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's where it is on, else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# Autocast keeps its bf16/fp16 copy of a parameter for its whole region, so a dense layer's weights are
# cast once per ``generate``; an expert reads a slice of its ``[E, ...]`` parameter, which autocast does
# not keep, so each call casts its experts again. Inside ``reused_casts()``, without gradients
# (``generate`` opens one), each parameter is cast whole once and sliced while it is unchanged. Only
# parameters: a weight computed at each call (a LoRA parametrization) is a new tensor every time.
# id -> (the parameter, its version, its cast), while open; holding the parameter keeps its id from
# being reused by another tensor while the context lasts; one cast per parameter.
_casts: dict[int, tuple[nn.Parameter, int, Tensor]] | None = None


@contextmanager
def reused_casts():
    """Within it, each expert parameter is cast to the compute dtype once and reused while unchanged."""
    global _casts
    outer = _casts
    _casts = {} if outer is None else outer
    try:
        yield
    finally:
        _casts = outer


def expert_weights(t: Tensor | None, experts: slice | int, dtype: torch.dtype | None = None) -> Tensor | None:
    """``t[experts]`` in ``dtype`` (default: its own): sliced from a cast of the whole parameter kept by
    ``reused_casts()`` where one is open, else the slice cast alone."""
    if t is None:
        return None
    if dtype in (None, t.dtype):
        return t[experts]  # no ``to``: one op fewer per weight on the decode path
    if _casts is None or not isinstance(t, nn.Parameter) or torch.is_grad_enabled():  # no cast to keep
        return t[experts].to(dtype)
    entry = _casts.get(id(t))
    if entry is None or entry[1] != t._version or entry[2].dtype != dtype:
        entry = _casts[id(t)] = (t, t._version, t.detach().to(dtype))
    return entry[2][experts]


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

    # Group sizes are data: traced by torch.compile, every new pattern of sizes (and the host-side
    # walk and form choice) would recompile, so the experts run eagerly inside a compiled model.
    @torch.compiler.disable
    def forward(self, x: Tensor, dispatch: Dispatch) -> Tensor:
        """``x``: ``(T, D_in)``. Returns ``(T, D_out)``: each position's weighted sum of expert outputs."""
        if self.implementation == "loop":
            return self._forward_loop(x, dispatch)
        if self.implementation == "grouped":
            return grouped_experts(
                x, as_dtype(dispatch.weights, x.dtype), dispatch.token_idx, dispatch.counts,
                self.in_proj, self.in_bias, self.out_proj, self.out_bias, self.gated, self.activation,
            )
        raise ValueError(f"implementation={self.implementation!r} is not one of ['grouped', 'loop']")

    def forward_position(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """One position ``x`` ``(1, D_in)`` through its experts ``indices`` with ``weights`` (both
        ``(1, k)``), straight: at batch-1 decoding the sort, gather and scatter of a dispatch cost
        more than the experts' matmuls. Returns ``(1, D_out)``."""
        dtype = compute_dtype(x)
        with autocast_off(x.device.type):  # cast here, each weight through expert_weights
            x = as_dtype(x, dtype)
            ys = torch.cat([self.expert(e, x, dtype) for e in indices.tolist()[0]])  # (k, D_out)
            return torch.mm(as_dtype(weights, dtype), ys)

    def expert(self, e: int, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Expert ``e`` on the rows ``x``, plain autograd (the loop reference); its weights in ``dtype``
        where given (``expert_weights``)."""
        act = EXPERT_ACTIVATIONS[self.activation][0]
        h = F.linear(x, expert_weights(self.in_proj, e, dtype), expert_weights(self.in_bias, e, dtype))
        if self.gated:
            gate, value = h.chunk(2, dim=-1)
            h = act(gate) * value
        else:
            h = act(h)
        return F.linear(h, expert_weights(self.out_proj, e, dtype), expert_weights(self.out_bias, e, dtype))

    def _forward_loop(self, x: Tensor, dispatch: Dispatch) -> Tensor:
        out = x.new_zeros(x.shape[0], self.out_proj.shape[1], dtype=compute_dtype(x))
        start = 0
        for e, size in enumerate(dispatch.group_sizes):
            if size == 0:
                continue
            rows = dispatch.token_idx[start : start + size]
            y = self.expert(e, x[rows])
            out = out.index_add(0, rows, y * dispatch.weights[start : start + size, None].to(y.dtype))
            start += size
        return out

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in={self.in_proj.shape[-1]}, hidden={self.hidden_features}, "
            f"out={self.out_proj.shape[1]}, gated={self.gated}, activation={self.activation}, "
            f"implementation={self.implementation}"
        )


class _Trials:
    """A kernel class's calls on trial: how many started, and the seconds of each that ran through."""

    def __init__(self):
        self.started = 0
        self.seconds: dict[str, list[float]] = {kernel: [] for kernel in KERNELS}

    def best(self) -> str:
        """The kernel of the lower median seconds (the walk where none ran through)."""
        return min(KERNELS, key=lambda kernel: statistics.median(self.seconds[kernel] or [math.inf]))


_trials: dict[str, _Trials] = {}  # kernel class on trial -> its trials


class KernelTrial:
    """The kernel one call runs on. On trial (``trials`` of its class ``key`` given) the call is timed
    as it runs, each part inside ``with trial:`` (its forward, its backward), and ``record``ed once
    complete."""

    def __init__(self, kernel: str, trials: _Trials | None = None, key: str | None = None):
        self.kernel, self.trials, self.key, self.seconds = kernel, trials, key, 0.0

    def __enter__(self):
        if self.trials is not None:
            self._start = time.perf_counter()

    def __exit__(self, *_):
        if self.trials is not None:
            self.seconds += time.perf_counter() - self._start

    def record(self) -> None:
        if self.trials is not None:
            self.trials.seconds[self.kernel].append(self.seconds)


def _kernel(args: tuple, backward: bool) -> KernelTrial:
    """The kernel a call (``_expert_forward``'s ``args``; ``backward``: a backward will follow) runs
    on: ``F.grouped_mm`` where torch has it and takes the operands, always on CUDA; on CPU the kernel
    class's pick (``_cpu_kernel``); the walk elsewhere."""
    x, in_proj, out_proj = args[0], args[4], args[6]
    if not (hasattr(F, "grouped_mm") and _grouped_mm_accepts(x, in_proj, out_proj)):
        return KernelTrial("walk")
    if x.device.type != "cpu":
        return KernelTrial("grouped_mm" if x.device.type == "cuda" else "walk")
    return _cpu_kernel(args, backward)


def _cpu_kernel(args: tuple, backward: bool) -> KernelTrial:
    """This kernel class's kept kernel (``KERNELS``), or its next trial: its first ``TRIAL_CALLS``
    calls take the kernels in turn, the one after them keeps the better. The walk, untimed, when a
    form is forced."""
    if forced_form():
        return KernelTrial("walk")
    x, _, token_idx, counts, in_proj, _, out_proj, *_ = args
    key = kernel_class(x, token_idx, counts, in_proj, out_proj, backward)
    if key in _chosen_forms:
        return KernelTrial(_chosen_forms[key])
    trials = _trials.setdefault(key, _Trials())
    if trials.started == TRIAL_CALLS:
        _chosen_forms[key] = trials.best()
        del _trials[key]
        return KernelTrial(_chosen_forms[key])
    kernel = KERNELS[trials.started % len(KERNELS)]
    trials.started += 1
    return KernelTrial(kernel, trials, key)


def kernel_class(x: Tensor, token_idx: Tensor, counts: Tensor, in_proj: Tensor, out_proj: Tensor, backward: bool) -> str:
    """Calls that share a kernel: assignments and experts that got any (each rounded up to a power of
    two), the experts' shapes, and whether a backward follows. Both kernels' costs follow the experts
    touched (their weights, the walk's blocks): at the first step of batched greedy decoding every
    sequence has the same last token, so two experts get all rows, a call unlike the steps after it.
    Counting them reads ``counts`` on the host: on CPU there is no device to wait for."""
    touched = rows_class(int(counts.count_nonzero()))
    shapes = "x".join(map(str, in_proj.shape)) + "," + "x".join(map(str, out_proj.shape))
    return (f"kernel rows={rows_class(token_idx.shape[0])} touched={touched} experts={shapes} {x.dtype} "
            f"{x.device.type}{' backward' if backward else ''}")


def _grouped_mm_accepts(x: Tensor, *weights: Tensor) -> bool:
    """``F.grouped_mm`` takes float32/bf16/fp16 with every row a multiple of 16 bytes (in ``x``'s dtype)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return all(w.shape[-1] * x.element_size() % 16 == 0 and w.shape[-2] * x.element_size() % 16 == 0 for w in weights)


class _Blocks:
    """How one call walks the assignments: row blocks, each handled by one matmul per projection.

    On CPU, a block per expert: its projections and activation run back to back while its rows
    are in cache, and every intermediate is one expert's rows (megabytes, reused by the
    allocator; an ``(N, H)`` buffer would be fresh pages to fault in on every call). With
    ``F.grouped_mm`` (CUDA), one block holds every expert, each projection is one launch, and the
    group sizes never leave the device. Blocks are walked in ``chunks`` (NOTE 3).
    """

    def __init__(self, counts: Tensor, rows: int, grouped: bool, pad: bool = False, *, row_bytes: int):
        self.counts, self.rows, self.pad = counts, rows, pad and not grouped
        self.forced = forced_form()  # read once per call, not per matmul
        if grouped:
            self.offsets = counts.cumsum(0).to(torch.int32)
            self.blocks = [(slice(0, rows), slice(0, counts.shape[0]))]
        else:
            self.offsets = None
            self.sizes = counts.tolist()  # the walk slices on the host: this call's one sync
            starts = itertools.accumulate(self.sizes, initial=0)
            self.blocks = [(slice(s, s + n), slice(e, e + 1)) for e, (s, n) in enumerate(zip(starts, self.sizes)) if n]
        self.chunks = self._chunks(CHUNK_BYTES // row_bytes)  # rows per chunk

    def _chunks(self, budget: int) -> list[tuple[slice, list[tuple[slice, slice]]]]:
        """Consecutive blocks grouped while their rows stay within ``budget`` (a block larger than
        that is a chunk of its own): ``(rows of the chunk, its blocks with rows within it)``."""
        groups: list[list[tuple[slice, slice]]] = []
        for block in self.blocks:
            if groups and block[0].stop - groups[-1][0][0].start <= budget:
                groups[-1].append(block)
            else:
                groups.append([block])
        chunks = []
        for group in groups:
            first = group[0][0].start
            chunks.append((slice(first, group[-1][0].stop), [(slice(r.start - first, r.stop - first), e) for r, e in group]))
        return chunks

    def padded(self, t: Tensor) -> Tensor:
        """One block's rows ``t`` followed by zero rows up to ``padded_rows`` (when padding: NOTE 6)."""
        extra = padded_rows(t.shape[0]) - t.shape[0] if self.pad else 0
        return F.pad(t, (0, 0, 0, extra)) if extra else t

    @cached_property
    def expert_of_row(self) -> Tensor:
        """``(N,)`` the expert of each assignment (grouped path; no host sync)."""
        experts = torch.arange(self.counts.shape[0], device=self.counts.device)
        return experts.repeat_interleave(self.counts, output_size=self.rows)

    def _expert_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``expert_linear`` with the forced form read once for the call."""
        return MATMUL_FORMS[self.forced or tuned_form(x, weight, bias)](x, weight, bias)

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``x @ weight[e].T (+ bias[e])`` for the block's experts; ``weight`` is ``(E_b, out, in)``."""
        if self.offsets is None:
            return self._expert_linear(x, weight[0], None if bias is None else bias[0])
        out = F.grouped_mm(x, weight.transpose(1, 2), offs=self.offsets)
        if bias is not None:
            out += bias[self.expert_of_row]
        return out

    def input_grad(self, grad: Tensor, weight: Tensor) -> Tensor:
        """``grad @ weight[e]`` for the block's experts."""
        if self.offsets is None:
            return self._expert_linear(grad, weight[0].t(), None)
        return F.grouped_mm(grad, weight, offs=self.offsets)

    def weight_grad(self, grad: Tensor, inputs: Tensor, buffer: Tensor, experts: slice) -> Tensor:
        """``grad_e.T @ inputs_e`` for the block's experts, in ``buffer[experts]``; returns the
        gradient of every expert (with grouped_mm, a new tensor covering them all)."""
        if self.offsets is not None:
            return F.grouped_mm(grad.t(), inputs, offs=self.offsets)
        torch.mm(grad.t(), inputs, out=buffer[experts.start])
        return buffer

    def bias_grad(self, grad: Tensor, buffer: Tensor | None, experts: slice) -> Tensor | None:
        if buffer is None:
            return None
        if self.offsets is not None:
            return buffer.zero_().index_add_(0, self.expert_of_row, grad)
        torch.sum(grad, dim=0, out=buffer[experts.start])
        return buffer

    def zero_idle(self, grad: Tensor) -> None:
        """Zero the gradient of the experts that got no rows: the walk never writes them, and CUDA's
        grouped_mm may leave them undefined. Torch's CPU grouped_mm, one matmul per group, writes
        zeros there (an empty sum): masking every expert's gradient would cost a pass over all of
        them, about 2 % of the tiny model's train step."""
        if self.offsets is not None:
            if grad.device.type != "cpu":
                grad.masked_fill_((self.counts == 0).view(-1, *[1] * (grad.dim() - 1)), 0)
            return
        idle = [e for e, size in enumerate(self.sizes) if size == 0]
        if idle:
            grad[idle] = 0


def _activate(h: Tensor, gated: bool, act) -> tuple[Tensor, Tensor | None]:
    """``act(gate) * value`` (gated) or ``act(h)``, and ``act(gate)`` for the backward."""
    if not gated:
        return act(h), None
    gate, value = h.chunk(2, dim=-1)
    act_gate = act(gate)
    return act_gate * value, act_gate


def _activate_backward(grad: Tensor, h: Tensor, act_gate: Tensor | None, act_backward) -> Tensor:
    """The gradient of ``_activate`` with respect to ``h``."""
    grad_h = torch.empty_like(h)
    if act_gate is None:
        return act_backward(grad, h, grad_h)
    gate, value = h.chunk(2, dim=-1)
    grad_gate, grad_value = grad_h.chunk(2, dim=-1)
    act_backward(grad * value, gate, grad_gate)
    torch.mul(grad, act_gate, out=grad_value)
    return grad_h


def grouped_experts(x, weights, token_idx, counts, in_proj, in_bias, out_proj, out_bias, gated, activation) -> Tensor:
    """The grouped kernel: through ``GroupedExpertsFunction`` where a gradient is needed, else
    straight (decoding: no autograd node, nothing kept for a backward)."""
    args = (x, weights, token_idx, counts, in_proj, in_bias, out_proj, out_bias, gated, activation)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args):
        return GroupedExpertsFunction.apply(*args)
    return _in_compute_dtype(x, weights, *args[2:], keep=False)[0]


def _in_compute_dtype(x, weights, *args, keep: bool) -> tuple[Tensor, tuple | None, KernelTrial]:
    """``_expert_forward`` in the compute dtype: under autocast, autocast's, applied explicitly (the
    backward turns autocast off as well). Each block casts only its own experts' weights: a decode step
    uses a few of them. Also returns the call's ``KernelTrial``, complete unless ``keep`` (a backward
    follows, to be timed as well)."""
    dtype = compute_dtype(x)
    with autocast_off(x.device.type):
        args = (as_dtype(x, dtype), as_dtype(weights, dtype), *args)
        trial = _kernel(args, backward=keep)
        with trial:
            out, kept = _expert_forward(*args, grouped=trial.kernel == "grouped_mm", keep=keep)
        if not keep:
            trial.record()
        return out, kept, trial


def _expert_forward(
    x, weights, token_idx, counts, in_proj, in_bias, out_proj, out_bias, gated, activation, *, grouped: bool, keep: bool
) -> tuple[Tensor, tuple | None]:
    """Per chunk: gather -> expert FFNs block by block (``grouped``: one block of every expert, on
    ``F.grouped_mm``) -> weighted scatter-add. Returns ``(T, D_out)`` and, when ``keep``, what the
    backward needs."""
    act = EXPERT_ACTIVATIONS[activation][0]
    plan = _Blocks(counts, token_idx.shape[0], grouped, pads_rows(x), row_bytes=x.shape[1] * x.element_size())
    out = x.new_zeros(x.shape[0], out_proj.shape[1])  # (T, D_out)
    saved = []  # per chunk: (per block: what its backward needs), the chunk's expert outputs
    for rows, blocks in plan.chunks:
        x_chunk = x.index_select(0, token_idx[rows])  # (n_chunk, D_in): its experts' rows back to back
        ys, kept = [], []
        for block_rows, experts in blocks:
            w_in, b_in, w_out, b_out = (
                expert_weights(t, experts, x.dtype) for t in (in_proj, in_bias, out_proj, out_bias)
            )
            xs = plan.padded(x_chunk[block_rows])  # (n', D_in), n' >= n (zero rows after n)
            h = plan.linear(xs, w_in, b_in)  # (n', G*H)
            a, act_gate = _activate(h, gated, act)  # (n', H)
            y = plan.linear(a, w_out, b_out)  # (n', D_out)
            ys.append(y[: block_rows.stop - block_rows.start])
            if keep:
                kept.append((xs, h, act_gate, a, w_in, w_out))
        y_chunk = torch.cat(ys) if len(ys) > 1 else ys[0]  # (n_chunk, D_out)
        out.index_add_(0, token_idx[rows], y_chunk * weights[rows, None])
        if keep:
            saved.append((kept, y_chunk))
    return out, (plan, saved) if keep else None


class GroupedExpertsFunction(torch.autograd.Function):
    """``_expert_forward`` with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, weights, token_idx, counts, in_proj, in_bias, out_proj, out_bias, gated, activation):
        ctx.dtypes = (x.dtype, weights.dtype, in_proj.dtype, None if in_bias is None else in_bias.dtype)
        out, ctx.kept, ctx.trial = _in_compute_dtype(
            x, weights, token_idx, counts, in_proj, in_bias, out_proj, out_bias, gated, activation, keep=True
        )
        ctx.save_for_backward(weights.to(out.dtype), token_idx, in_proj, out_proj)
        ctx.meta = (activation, in_bias is not None, out_bias is not None, x.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # A backward called inside an autocast region runs under it: off here, as in the forward,
        # so the gradients are computed in the dtype the forward kept (its buffers' dtype).
        with ctx.trial, autocast_off(grad_out.device.type):
            grads = _expert_backward(ctx, grad_out)
        ctx.trial.record()
        grad_x, grad_weights, grad_in_proj, grad_in_bias, grad_out_proj, grad_out_bias = grads
        x_dtype, weights_dtype, param_dtype, bias_dtype = ctx.dtypes
        to = lambda t, dtype: None if t is None else t.to(dtype)  # noqa: E731
        return (
            to(grad_x, x_dtype), to(grad_weights, weights_dtype), None, None, to(grad_in_proj, param_dtype),
            to(grad_in_bias, bias_dtype), to(grad_out_proj, param_dtype), to(grad_out_bias, bias_dtype), None, None,
        )


def _expert_backward(ctx, grad_out) -> tuple:
    """The gradients of ``GroupedExpertsFunction``'s call that ``ctx`` kept, in the compute dtype:
    of the input and the routing weights (None where not needed), the projections and their biases
    (None where there are none)."""
    weights, token_idx, in_proj, out_proj = ctx.saved_tensors
    activation, has_in_bias, has_out_bias, x_shape = ctx.meta
    (plan, saved), act_backward = ctx.kept, EXPERT_ACTIVATIONS[activation][1]
    need_x, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x = grad_out.new_zeros(x_shape) if need_x else None
    grad_weights = weights.new_empty(weights.shape) if need_weights else None
    # Gradients in the compute dtype (the parameters' own dtype may differ under autocast).
    grad_in_proj, grad_out_proj = grad_out.new_empty(in_proj.shape), grad_out.new_empty(out_proj.shape)
    grad_in_bias = grad_out.new_empty(in_proj.shape[:2]) if has_in_bias else None
    grad_out_bias = grad_out.new_empty(out_proj.shape[:2]) if has_out_bias else None
    for (rows, blocks), (kept, y_chunk) in zip(plan.chunks, saved):
        gy_chunk = grad_out.index_select(0, token_idx[rows])  # (n_chunk, D_out)
        if need_weights:
            grad_weights[rows] = (gy_chunk * y_chunk).sum(-1)
        gy_chunk *= weights[rows, None]
        grad_x_chunk = []
        for (block_rows, experts), (xs, h, act_gate, a, w_in, w_out) in zip(blocks, kept):
            gy = plan.padded(gy_chunk[block_rows])  # (n', D_out): its zero rows add nothing below
            grad_out_proj = plan.weight_grad(gy, a, grad_out_proj, experts)
            grad_out_bias = plan.bias_grad(gy, grad_out_bias, experts)
            gh = _activate_backward(plan.input_grad(gy, w_out), h, act_gate, act_backward)  # (n', G*H)
            grad_in_proj = plan.weight_grad(gh, xs, grad_in_proj, experts)
            grad_in_bias = plan.bias_grad(gh, grad_in_bias, experts)
            if need_x:
                grad_x_chunk.append(plan.input_grad(gh, w_in)[: block_rows.stop - block_rows.start])
        if need_x:
            grad_x.index_add_(0, token_idx[rows], torch.cat(grad_x_chunk) if len(grad_x_chunk) > 1 else grad_x_chunk[0])
    for grad in (grad_in_proj, grad_out_proj, grad_in_bias, grad_out_bias):
        if grad is not None:
            plan.zero_idle(grad)
    return grad_x, grad_weights, grad_in_proj, grad_in_bias, grad_out_proj, grad_out_bias
