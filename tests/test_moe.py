"""Tests of the sparse MoE layer (``vlmoe.moe``): router -> experts -> layer.

Every test compares against an independent reference (a plain per-assignment loop, the dense
MLP, timm / transformers modules, transformers' ``MixtralSparseMoeBlock`` and
``load_balancing_loss_func``), checks a value derived by hand, or checks a clear error.
Tiny sizes, CPU, float64 where the comparison is exact up to rounding.
"""

from __future__ import annotations

import json

import dataclasses
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlmoe.moe import (
    PADDING, Dispatch, Experts, FeedForward, MoEConfig, MoELayer, SharedMoE, moe_layers_of, moe_scope,
)
from vlmoe.moe import experts as experts_module
from vlmoe.moe.experts import GroupedExpertsFunction
from vlmoe.moe.layer import flat_modality
from vlmoe.moe.router import TokenChoiceRouter

F64 = torch.float64
IMPLEMENTATIONS = ("grouped", "loop")
DIM, HIDDEN = 16, 32

# Six experts: [0, 2) reserved to modality 0 (image), [2, 3) to modality 1 (text), [3, 6) open.
PARTITION = {"num_experts": 6, "experts_per_modality": [2, 1]}
MODES = {
    "shared": {"num_experts": 4},
    "per_modality": {"num_experts": 4},
    "partitioned": PARTITION,
}
ROUTING = {  # name: (router, capacity_factor)
    "token_dropless": ("token_choice", None),
    "token_capacity": ("token_choice", 0.5),
    "expert_choice": ("expert_choice", None),
    "expert_capacity": ("expert_choice", 0.5),
}


# ----------------------------------------------------------------------------- helpers


def make_layer(dtype=F64, dim=DIM, hidden=HIDDEN, causal=False, seed=0, bias=None, out=None, **config) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(dim, hidden, out, bias=bias, config=MoEConfig(**config), causal=causal, dtype=dtype)


def clone_with(layer: MoELayer, dtype=None, **changes) -> MoELayer:
    """The same layer (weights included) with some config fields or the dtype changed."""
    experts = layer.experts
    other = MoELayer(
        experts.in_proj.shape[-1], experts.hidden_features, experts.out_proj.shape[1],
        bias=experts.in_bias is not None, config=dataclasses.replace(layer.config, **changes),
        causal=layer.causal, activation=experts.activation, dtype=dtype or experts.in_proj.dtype,
    )
    other.load_state_dict(layer.state_dict())
    return other


def two_modalities(batch: int = 2, seq: int = 8) -> torch.Tensor:
    """``(B, T)`` modality ids with both modalities in every sequence, image first."""
    modality = torch.ones(batch, seq, dtype=torch.long)
    for b in range(batch):
        modality[b, : seq // 2 - b] = 0
    return modality


def run_layer(layer: MoELayer, x: torch.Tensor, modality, grad_out: torch.Tensor, input_grad: bool = True):
    """Forward with aux, backward of ``<grad_out, y>``; returns (output, input grad, param grads)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(input_grad)
    out = layer.forward_with_aux(x, modality)
    (out.hidden_states * grad_out).sum().backward()
    return out, x.grad, {name: p.grad for name, p in layer.named_parameters()}


_ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}


def grouped_and_loop(**kwargs) -> tuple[Experts, Experts]:
    """Four float32 experts (seed 0) as the grouped kernel runs them, and the loop reference with the same weights."""
    torch.manual_seed(0)
    experts = Experts(4, DIM, HIDDEN, dtype=torch.float32, **kwargs)
    loop = Experts(4, DIM, HIDDEN, implementation="loop", dtype=torch.float32, **kwargs)
    loop.load_state_dict(experts.state_dict())
    return experts, loop


def expert_ffn(experts: Experts, e: int, v: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` on rows ``v``, written out from the parameters."""
    act = _ACT[experts.activation]
    h = v @ experts.in_proj[e].t()
    if experts.in_bias is not None:
        h = h + experts.in_bias[e]
    if experts.gated:
        gate, value = h[:, : experts.hidden_features], h[:, experts.hidden_features :]
        h = act(gate) * value
    else:
        h = act(h)
    y = h @ experts.out_proj[e].t()
    if experts.out_bias is not None:
        y = y + experts.out_bias[e]
    return y


def reference_forward(layer: MoELayer, x: torch.Tensor, modality: torch.Tensor):
    """The layer's output assignment by assignment, and the dropped fraction per modality.

    Token choice with a capacity: each expert takes assignments first choices first, positions
    in order, until it holds ``ceil(capacity_factor * T * k / E)``. Expert choice: in each
    sequence (the last leading dimension of ``x``), every expert takes its ``capacity`` most
    probable positions, those with a non-zero probability.
    """
    config = layer.config
    x2d = x.reshape(-1, x.shape[-1])
    modality = modality.expand(x.shape[:-1]).reshape(-1)
    r = layer.router(x2d, modality)
    out = [x2d.new_zeros(layer.experts.out_proj.shape[1]) for _ in range(x2d.shape[0])]
    dropped = torch.zeros(config.num_modalities, dtype=F64)
    assigned = torch.zeros(config.num_modalities, dtype=F64)
    if config.router == "token_choice":
        num_tokens, k = r.indices.shape
        capacity = math.inf
        if config.capacity_factor is not None:
            capacity = math.ceil(config.capacity_factor * num_tokens * k / config.num_experts)
        used = [0] * config.num_experts
        for slot in range(k):
            for t in range(num_tokens):
                e = int(r.indices[t, slot])
                assigned[modality[t]] += 1
                if used[e] >= capacity:
                    dropped[modality[t]] += 1
                    continue
                used[e] += 1
                out[t] = out[t] + r.weights[t, slot].to(x.dtype) * expert_ffn(layer.experts, e, x2d[t : t + 1])[0]
    else:
        length = x.shape[-2]
        for start in range(0, x2d.shape[0], length):
            for e in range(config.num_experts):
                picked = r.probs[start : start + length, e].topk(layer.router.capacity(length))
                for w, i in zip(picked.values, picked.indices.tolist()):
                    t = start + i
                    if w > 0:
                        out[t] = out[t] + w.to(x.dtype) * expert_ffn(layer.experts, e, x2d[t : t + 1])[0]
    y = torch.stack(out)
    if layer.shared_experts is not None:
        y = y + layer.shared_experts(x2d)
    return y.view(*x.shape[:-1], -1), dropped / assigned.clamp(min=1)


def assert_close(actual, expected, atol=1e-10, rtol=1e-8, **kw):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, **kw)


# ----------------------------------------------------------- 1. grouped == loop == reference


EXPERT_VARIANTS = {  # name: (expert_type, bias, out_features)
    "swiglu": ("swiglu", None, None),
    "gelu": ("gelu", None, None),
    "swiglu_bias_wider_out": ("swiglu", True, 24),
    "gelu_nobias": ("gelu", False, None),
}


@pytest.mark.parametrize("routing", list(ROUTING))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("variant", list(EXPERT_VARIANTS))
def test_grouped_equals_loop_equals_reference(routing, mode, variant):
    router, capacity_factor = ROUTING[routing]
    expert_type, bias, out_features = EXPERT_VARIANTS[variant]
    grouped = make_layer(
        **MODES[mode], top_k=2, router=router, capacity_factor=capacity_factor, modality_mode=mode,
        expert_type=expert_type, implementation="grouped", bias=bias, out=out_features,
    )
    assert (grouped.experts.in_bias is not None) == (bias if bias is not None else expert_type == "gelu")
    loop = clone_with(grouped, implementation="loop")
    torch.manual_seed(1)
    x = torch.randn(2, 8, DIM, dtype=F64)
    grad_out = torch.randn(2, 8, out_features or DIM, dtype=F64)
    modality = two_modalities()

    out_g, gx_g, grads_g = run_layer(grouped, x, modality, grad_out)
    out_l, gx_l, grads_l = run_layer(loop, x, modality, grad_out)

    # The reference: plain autograd through a per-assignment loop.
    grouped.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    y_ref, dropped_ref = reference_forward(grouped, xr, modality)
    (y_ref * grad_out).sum().backward()
    grads_ref = {name: p.grad for name, p in grouped.named_parameters()}

    assert_close(out_g.hidden_states, y_ref)
    assert_close(out_l.hidden_states, y_ref)
    assert_close(gx_g, xr.grad)
    assert_close(gx_l, xr.grad)
    assert set(grads_g) == set(grads_l) == set(grads_ref)
    for name in grads_ref:
        assert_close(grads_g[name], grads_ref[name], msg=f"grouped grad of {name}")
        assert_close(grads_l[name], grads_ref[name], msg=f"loop grad of {name}")
    # The router learns through the routing weights (the loss above has no aux term).
    assert grads_g["router.weight"].abs().sum() > 0
    for field in ("router_logits", "load", "dropped", "tokens", "load_balance", "entropy"):
        assert torch.equal(getattr(out_g, field), getattr(out_l, field)), field
    assert_close(out_g.dropped.double(), dropped_ref, atol=1e-7, rtol=0)
    if routing == "token_capacity":
        assert out_g.dropped.sum() > 0, "capacity_factor=0.5 must drop assignments"
    else:
        assert out_g.dropped.sum() == 0


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("variant", list(EXPERT_VARIANTS))
def test_one_position_goes_straight_to_its_experts(monkeypatch, variant, mode, capacity_factor, top_k):
    """Batch-1 decoding: a single position skips the dispatch (no sort, gather or scatter) and
    computes what the loop computes, gradients included; the statistics, found from the routing
    when read, are the loop's."""
    expert_type, bias, out_features = EXPERT_VARIANTS[variant]
    grouped = make_layer(
        **MODES[mode], top_k=top_k, capacity_factor=capacity_factor, modality_mode=mode,
        expert_type=expert_type, bias=bias, out=out_features,
    )
    loop = clone_with(grouped, implementation="loop")
    torch.manual_seed(1)
    x, modality = torch.randn(1, 1, DIM, dtype=F64), torch.ones(1, 1, dtype=torch.long)
    grad_out = torch.randn(1, 1, out_features or DIM, dtype=F64)
    dispatches = []
    dispatch = TokenChoiceRouter.dispatch
    monkeypatch.setattr(TokenChoiceRouter, "dispatch", lambda self, r: dispatches.append(self) or dispatch(self, r))

    out_g, gx_g, grads_g = run_layer(grouped, x, modality, grad_out)
    assert dispatches == []
    out_l, gx_l, grads_l = run_layer(loop, x, modality, grad_out)
    assert_close(out_g.hidden_states, out_l.hidden_states)
    assert_close(gx_g, gx_l)
    for name in grads_l:
        assert_close(grads_g[name], grads_l[name], msg=name)
    for field in ("load", "dropped", "tokens", "load_balance", "entropy", "load_balance_loss"):
        assert torch.equal(getattr(out_g, field), getattr(out_l, field)), field
    assert out_g.load.sum() == 1 and out_g.dropped.sum() == 0


def test_one_position_under_autocast_computes_in_its_dtype():
    layer = make_layer(num_experts=4, top_k=2, dtype=torch.float32)
    loop = clone_with(layer, implementation="loop")
    x = torch.randn(1, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one, reference = layer(x, 1), loop(x, 1)
    assert one.dtype == reference.dtype == torch.bfloat16
    assert_close(one.float(), reference.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_parameter_grads_without_input_grad(implementation):
    """The first layer of a model gets an input that needs no gradient; parameters still learn."""
    layer = make_layer(num_experts=4, top_k=2, expert_type="gelu", implementation=implementation)
    x = torch.randn(2, 8, DIM, dtype=F64)
    grad_out = torch.randn(2, 8, DIM, dtype=F64)
    _, gx, grads = run_layer(layer, x, 0, grad_out, input_grad=False)
    _, _, grads_ref = run_layer(layer, x, 0, grad_out, input_grad=True)
    assert gx is None
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], msg=name)


def _forms_by_rows(threshold: int):
    """A fake ``_time_form``: ``weight_first`` wins up to ``threshold`` rows, ``rows_first`` above."""
    def time_form(form, x, weight, bias):
        return float((form == "weight_first") == (x.shape[0] > threshold))
    return time_form


@pytest.mark.parametrize("chunk_rows", [None, 1, 30], ids=["one-chunk", "chunk-per-block", "mixed-chunks"])
@pytest.mark.parametrize("padded", [False, True], ids=["rows", "padded-rows"])
@pytest.mark.parametrize("variant", list(EXPERT_VARIANTS))
@pytest.mark.parametrize("forms", ["rows_first", "weight_first", "mixed", "measured"])
def test_cpu_block_forms_equal_loop(monkeypatch, variant, forms, padded, chunk_rows):
    """Each form of a CPU block's matmuls, both in one call (the autotune picks per shape class),
    and whatever this machine's timing picks, equal the loop; so do blocks padded with zero rows
    (as in bf16 on CPU), and blocks gathered in chunks of every size (NOTE 3)."""
    if chunk_rows is not None:
        monkeypatch.setattr(experts_module, "CHUNK_BYTES", chunk_rows * DIM * 8)  # float64 rows of DIM
    expert_type, bias, out_features = EXPERT_VARIANTS[variant]
    grouped = make_layer(num_experts=4, top_k=2, expert_type=expert_type, bias=bias, out=out_features)
    loop = clone_with(grouped, implementation="loop")
    x = torch.randn(3, 16, DIM, dtype=F64)
    grad_out = torch.randn(3, 16, out_features or DIM, dtype=F64)
    out_l, gx_l, grads_l = run_layer(loop, x, 0, grad_out)
    rows = (out_l.load * out_l.tokens[:, None] * 2).sum(0).round().long().tolist()  # rows of each expert's block
    assert max(rows) > min(rows), rows
    monkeypatch.setattr(experts_module, "pads_rows", lambda x: padded)
    if padded:
        assert any(experts_module.padded_rows(n) > n for n in rows), rows
    monkeypatch.setattr(experts_module, "_chosen_forms", {})
    if forms in experts_module.MATMUL_FORMS:
        monkeypatch.setenv(experts_module.FORM_ENV, forms)
    else:
        monkeypatch.delenv(experts_module.FORM_ENV, raising=False)
    if forms == "mixed":  # tall weights (in_proj, out_proj.T) take one form, wide ones the other
        def tall_first(form, x, weight, bias):
            return float((form == "weight_first") != (weight.shape[0] > weight.shape[1]))
        monkeypatch.setattr(experts_module, "_time_form", tall_first)
    out_g, gx_g, grads_g = run_layer(grouped, x, 0, grad_out)
    if forms == "mixed":
        assert set(experts_module._chosen_forms.values()) == set(experts_module.MATMUL_FORMS)
    assert_close(out_g.hidden_states, out_l.hidden_states)
    assert_close(gx_g, gx_l)
    for name in grads_l:
        assert_close(grads_g[name], grads_l[name], msg=name)


def test_blocks_are_gathered_in_chunks_within_the_budget():
    """Consecutive blocks share a chunk while their rows fit the budget; a larger block is a chunk
    of its own; rows within a chunk count from its start."""
    counts = torch.tensor([3, 0, 4, 9, 2, 2, 1])
    plan = experts_module._Blocks(counts, 21, grouped=False, row_bytes=experts_module.CHUNK_BYTES // 8)
    assert [(rows.start, rows.stop, [(r.start, r.stop, e.start) for r, e in blocks]) for rows, blocks in plan.chunks] == [
        (0, 7, [(0, 3, 0), (3, 7, 2)]), (7, 16, [(0, 9, 3)]), (16, 21, [(0, 2, 4), (2, 4, 5), (4, 5, 6)]),
    ]
    grouped = experts_module._Blocks(counts, 21, grouped=True, row_bytes=experts_module.CHUNK_BYTES // 8)
    assert [(rows, len(blocks)) for rows, blocks in grouped.chunks] == [(slice(0, 21), 1)]


def test_padded_rows_are_few_sizes_with_little_padding():
    assert [experts_module.padded_rows(n) for n in (0, 1, 15, 16, 17, 31, 33, 100, 1000, 1025)] == [
        0, 1, 15, 16, 18, 32, 36, 104, 1024, 1152]
    sizes = [experts_module.padded_rows(n) for n in range(1, 8193)]
    assert all(n <= size < n * 9 / 8 for n, size in enumerate(sizes, 1))
    assert len(set(sizes)) == 15 + 8 * 9 + 1  # every size below 16, 8 per power of two from 16 to 8192, 8192


@pytest.mark.parametrize("padded", [False, True], ids=["blocks", "padded-blocks"])
def test_grouped_kernel_without_gradient_runs_outside_autograd_and_computes_the_same(monkeypatch, padded):
    """Decoding (no gradient wanted) skips the autograd function and keeps nothing for a backward;
    the output is bit for bit the one the training path computes, and a frozen layer fed an
    input that needs no gradient takes the same path."""
    monkeypatch.setattr(experts_module, "pads_rows", lambda x: padded)
    layer = make_layer(num_experts=4, top_k=2)
    x = torch.randn(3, 16, DIM, dtype=F64)
    trained = layer(x, 0)
    assert trained.requires_grad
    monkeypatch.setattr(GroupedExpertsFunction, "apply", lambda *args: pytest.fail("went through autograd"))
    with torch.no_grad():
        decoded = layer(x, 0)
    assert decoded.grad_fn is None
    assert torch.equal(decoded, trained.detach())
    layer.requires_grad_(False)
    frozen = layer(x, 0)
    assert frozen.grad_fn is None and torch.equal(frozen, decoded)


def test_padding_only_for_reduced_precision_on_cpu():
    assert [experts_module.pads_rows(torch.zeros(2, 2, dtype=dtype)) for dtype in (F64, torch.float32)] == [False] * 2
    assert all(experts_module.pads_rows(torch.zeros(2, 2, dtype=dtype)) for dtype in (torch.bfloat16, torch.float16))


def test_autotune_measures_each_shape_class_once(monkeypatch):
    """The first call of a shape class times the forms; later calls reuse the winner."""
    monkeypatch.delenv(experts_module.FORM_ENV, raising=False)
    monkeypatch.setattr(experts_module, "_chosen_forms", {})
    timed = []
    fake = _forms_by_rows(8)
    monkeypatch.setattr(experts_module, "_time_form", lambda form, *args: timed.append(form) or fake(form, *args))
    weight = torch.randn(6, 5, dtype=F64)
    for rows in (3, 4, 2, 3, 30, 20):  # buckets 4, 4, 2, 4, 32, 32
        x = torch.randn(rows, 5, dtype=F64)
        assert_close(experts_module.expert_linear(x, weight), x @ weight.t(), atol=1e-12, rtol=0)
    assert {key.split()[0]: form for key, form in experts_module._chosen_forms.items()} == {
        "rows=4": "weight_first", "rows=2": "weight_first", "rows=32": "rows_first",
    }
    assert len(timed) == 3 * 2 * 4  # three classes, two forms, a warm-up and three rounds each
    # The transposed weight of the backward is another class.
    experts_module.expert_linear(torch.randn(3, 6, dtype=F64), weight.t())
    assert len(experts_module._chosen_forms) == 4


def test_chosen_forms_are_restored_not_measured_again(monkeypatch):
    """What a checkpoint keeps (``chosen_forms``) comes back in a new process (``restore_forms``)
    without timing: a resumed run computes with the forms of the run it continues."""
    monkeypatch.delenv(experts_module.FORM_ENV, raising=False)
    monkeypatch.setattr(experts_module, "_chosen_forms", {})
    monkeypatch.setattr(experts_module, "_time_form", _forms_by_rows(8))
    weight, x = torch.randn(6, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    experts_module.expert_linear(x, weight)
    saved = json.loads(json.dumps(experts_module.chosen_forms()))
    monkeypatch.setattr(experts_module, "_chosen_forms", {})
    monkeypatch.setattr(experts_module, "_time_form", lambda *args: pytest.fail("measured again"))
    experts_module.restore_forms(saved)
    assert experts_module.expert_form(x, weight) == "weight_first"
    experts_module.restore_forms({"kernel rows=4": "grouped_mm"})  # kernel choices come back too
    assert experts_module._chosen_forms["kernel rows=4"] == "grouped_mm"
    with pytest.raises(ValueError, match="'fastest'"):
        experts_module.restore_forms({"rows=4": "fastest"})


def fake_trial_times(monkeypatch, seconds) -> list[tuple[str, str]]:
    """Kernel trials record ``seconds(key, kernel)`` instead of their own time; returns the
    ``(key, kernel)`` of every trial recorded, in order."""
    recorded = []

    def record(trial):
        recorded.append((trial.key, trial.kernel))
        trial.trials.seconds[trial.kernel].append(seconds(trial.key, trial.kernel))

    monkeypatch.delenv(experts_module.FORM_ENV, raising=False)
    monkeypatch.setattr(experts_module, "_chosen_forms", {})
    monkeypatch.setattr(experts_module, "_trials", {})
    monkeypatch.setattr(experts_module.KernelTrial, "record", lambda trial: trial.trials is not None and record(trial))
    return recorded


def spy_grouped_mm(monkeypatch) -> list[int]:
    """A list that gets an item at every ``F.grouped_mm`` call."""
    calls, grouped_mm = [], F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *args, **kw: calls.append(1) or grouped_mm(*args, **kw))
    return calls


def train_call(module: Experts, counts: list[int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One forward and backward of ``module`` on ``counts`` rows per expert: the output and every gradient."""
    torch.manual_seed(seed)
    counts = torch.tensor(counts)
    n = int(counts.sum())
    x, weights = torch.randn(8, DIM, requires_grad=True), torch.rand(n, requires_grad=True)
    token_idx, grad_out = torch.randint(0, 8, (n,)), torch.randn(8, DIM)
    module.zero_grad(set_to_none=True)
    y = module(x, Dispatch(token_idx, weights, counts))
    (y * grad_out).sum().backward()
    return (y, x.grad, weights.grad, *(p.grad for p in module.parameters()))


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without grouped_mm")
def test_cpu_kernel_is_tried_on_each_kernel_class_own_calls_then_kept(monkeypatch):
    """On CPU each kernel class (assignments and experts touched, each rounded up to a power of two;
    whether a backward follows) runs its first ``TRIAL_CALLS`` calls on the walk and grouped_mm in
    turn, timed as they run, and the better kernel from then on; both equal the loop. A forced
    matmul form fixes the walk and tries nothing."""
    def seconds(key, kernel):  # grouped_mm wins up to 16 assignments unless one expert gets them all
        wins = "rows=16 " in key and "touched=1 " not in key
        return float((kernel == "grouped_mm") != wins)

    recorded = fake_trial_times(monkeypatch, seconds)
    grouped_calls = spy_grouped_mm(monkeypatch)
    experts, loop = grouped_and_loop()
    trials = experts_module.TRIAL_CALLS
    cases = [  # rows of each expert, the kernel kept
        ([3, 3, 3, 3], "grouped_mm"), ([12, 0, 0, 0], "walk"), ([2, 3, 4, 1], "grouped_mm"),
        ([10, 10, 10, 10], "walk"), ([0, 6, 6, 0], "grouped_mm"), ([0, 0, 9, 0], "walk"),
    ]
    for counts, kernel in cases:
        ran = []
        for _ in range(trials + 2):
            grouped_calls.clear()
            got = train_call(experts, counts)
            ran.append("grouped_mm" if grouped_calls else "walk")
        for got, expected in zip(got, train_call(loop, counts)):
            assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert ran[-2:] == [kernel] * 2, counts  # kept after the trials (or a class's earlier ones)
    classes = {tuple(key.split()[1:3]): kernel for key, kernel in experts_module._chosen_forms.items()
               if key.startswith("kernel")}
    assert classes == {
        ("rows=16", "touched=4"): "grouped_mm", ("rows=16", "touched=1"): "walk",
        ("rows=64", "touched=4"): "walk", ("rows=16", "touched=2"): "grouped_mm",
    }  # 12 and 10 assignments share a class, and so do two calls that touch one expert
    assert len(recorded) == 4 * trials and all(key.endswith(" backward") for key, _ in recorded)
    first = [kernel for _, kernel in recorded[:trials]]
    assert first == ["walk", "grouped_mm"] * (trials // 2)  # in turn

    monkeypatch.setenv(experts_module.FORM_ENV, "rows_first")
    monkeypatch.setattr(experts_module, "_chosen_forms", {})
    grouped_calls.clear()
    for _ in range(3):
        experts(torch.randn(8, DIM), Dispatch(torch.arange(6), torch.rand(6), torch.tensor([3, 3, 0, 0])))
    assert not grouped_calls and len(recorded) == 4 * trials


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without grouped_mm")
def test_kernel_trials_time_the_backward_and_end_at_a_checkpoint(monkeypatch):
    """A training call's trial is recorded once its backward ran (it is timed too), a call without
    gradients at its forward; those are classes of their own. ``chosen_forms()`` (what a checkpoint
    saves) ends every class's trials with the better kernel so far; a class restored from a
    checkpoint is not tried again."""
    timed = {"walk": [2.0] * 20, "grouped_mm": [1.5] * 20}
    recorded = fake_trial_times(monkeypatch, lambda key, kernel: timed[kernel].pop(0))
    grouped_calls = spy_grouped_mm(monkeypatch)
    experts, loop = grouped_and_loop()
    trials = experts_module.TRIAL_CALLS

    dispatch = Dispatch(torch.randint(0, 8, (12,)), torch.rand(12), torch.tensor([3, 3, 3, 3]))
    x = torch.randn(8, DIM, requires_grad=True)
    y = experts(x, dispatch)
    assert not recorded  # not before its backward
    y.sum().backward()
    assert len(recorded) == 1 and recorded[0][0].endswith(" backward")
    for _ in range(trials):
        train_call(experts, [3, 3, 3, 3])
    grouped_calls.clear()
    train_call(experts, [3, 3, 3, 3])
    assert grouped_calls  # kept: 1.5 against 2.0
    with torch.no_grad():
        experts(x, dispatch)
    assert len(recorded) == trials + 1 and not recorded[-1][0].endswith(" backward")  # recorded at once

    def run(counts) -> str:
        grouped_calls.clear()
        train_call(experts, counts)
        return "grouped_mm" if grouped_calls else "walk"

    timed.update(walk=[2.0] * 20, grouped_mm=[1.0] * 20)
    other = [8, 8, 0, 0]  # another class: two experts touched
    assert [run(other) for _ in range(3)] == ["walk", "grouped_mm", "walk"]  # on trial
    saved = experts_module.chosen_forms()
    assert [run(other) for _ in range(2 * trials)] == ["grouped_mm"] * 2 * trials  # trials ended
    monkeypatch.setattr(experts_module, "_chosen_forms", {})  # a new process, resumed
    assert run(other) == "walk"  # on trial again
    experts_module.restore_forms(saved)
    assert [run(other) for _ in range(2 * trials)] == ["grouped_mm"] * 2 * trials
    assert all(key.split()[1] == "rows=16" for key, _ in recorded)


def test_forced_form_must_exist(monkeypatch):
    monkeypatch.setenv(experts_module.FORM_ENV, "fastest")
    with pytest.raises(ValueError, match="VLMOE_EXPERT_FORM='fastest'"):
        experts_module.expert_linear(torch.randn(3, 5), torch.randn(6, 5))


@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_grouped_backward_gradcheck(expert_type):
    """The hand-written backward against finite differences, with an expert that gets no rows."""
    torch.manual_seed(0)
    experts = Experts(3, 4, 5, expert_type=expert_type, dtype=F64)
    x = torch.randn(4, 4, dtype=F64, requires_grad=True)
    weights = torch.rand(5, dtype=F64, requires_grad=True)
    token_idx, counts = torch.tensor([0, 2, 3, 1, 2]), torch.tensor([3, 0, 2])

    def fn(x, weights, in_proj, in_bias, out_proj, out_bias):
        return GroupedExpertsFunction.apply(
            x, weights, token_idx, counts, in_proj, in_bias, out_proj, out_bias, experts.gated, experts.activation
        )

    inputs = (x, weights, experts.in_proj, experts.in_bias, experts.out_proj, experts.out_bias)
    assert torch.autograd.gradcheck(fn, inputs)
    # And the loop implementation agrees on the same dispatch.
    dispatch = Dispatch(token_idx, weights, counts)
    experts.implementation = "loop"
    y_loop = experts(x, dispatch)
    assert_close(fn(*inputs), y_loop)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without grouped_mm")
@pytest.mark.parametrize(
    "dtype, dim, hidden",
    [
        pytest.param(torch.float32, 16, 32, id="float32"),
        pytest.param(torch.bfloat16, 16, 32, id="bfloat16"),
        # torch's grouped_mm takes only float32/bfloat16/float16 with rows a multiple of 16 bytes:
        # the layer falls back to the per-expert loop for these.
        pytest.param(torch.float64, 16, 32, id="float64"),
        pytest.param(torch.float32, 18, 30, id="float32-unaligned"),
        pytest.param(torch.bfloat16, 20, 36, id="bfloat16-unaligned"),
    ],
)
@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_grouped_mm_branch_equals_loop(monkeypatch, expert_type, dtype, dim, hidden):
    """The ``F.grouped_mm`` branch (taken on CUDA, and on CPU where it measures faster than the walk).

    torch's grouped_mm validates its inputs the same way on every device, so this is also what a
    CUDA run of the layer does, minus the kernel.
    """
    monkeypatch.setattr(experts_module, "_cpu_kernel", lambda *args: experts_module.KernelTrial("grouped_mm"))
    grouped = make_layer(dtype=dtype, dim=dim, hidden=hidden, num_experts=4, top_k=2, expert_type=expert_type)
    loop = clone_with(grouped, implementation="loop")
    torch.manual_seed(1)
    x = torch.randn(2, 8, dim).to(dtype)
    grad_out = torch.randn(2, 8, dim).to(dtype)
    out_g, gx_g, grads_g = run_layer(grouped, x, 0, grad_out)
    out_l, gx_l, grads_l = run_layer(loop, x, 0, grad_out)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    assert_close(out_g.hidden_states, out_l.hidden_states, **tol)
    assert_close(gx_g, gx_l, **tol)
    for name in grads_l:
        assert_close(grads_g[name], grads_l[name], **tol, msg=name)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without grouped_mm")
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_grouped_mm_branch_gives_idle_experts_zero_gradient(monkeypatch, bias):
    """Experts that get no rows get exactly zero gradients on the grouped_mm branch. On CPU nothing
    masks them: torch's CPU grouped_mm writes zeros for an empty group, also where its output
    lands on memory that held other values (blocks of the gradients' size filled with NaN and
    freed just before, for the allocator to hand out again)."""
    monkeypatch.setattr(experts_module, "_cpu_kernel", lambda *args: experts_module.KernelTrial("grouped_mm"))
    experts, loop = grouped_and_loop(expert_type="gelu", bias=bias)
    counts = torch.tensor([3, 0, 4, 0])
    x, weights, token_idx, grad_out = torch.randn(5, DIM), torch.rand(7), torch.randint(0, 5, (7,)), torch.randn(5, DIM)
    grads = []
    for module in (experts, loop):
        module.zero_grad(set_to_none=True)
        y = module(x, Dispatch(token_idx, weights, counts))
        for p in module.parameters():
            torch.full_like(p, float("nan"))
        (y * grad_out).sum().backward()
        grads.append({name: p.grad for name, p in module.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.equal(grad[[1, 3]], torch.zeros_like(grad[[1, 3]])), name
        assert_close(grad, grads[1][name], atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------- 2. one expert, top-1 == dense


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_one_expert_top1_equals_dense(expert_type, implementation, router):
    layer = make_layer(
        num_experts=1, top_k=1, router=router, expert_type=expert_type, implementation=implementation
    )
    dense = FeedForward(DIM, HIDDEN, expert_type=expert_type, dtype=F64)
    experts = layer.experts
    with torch.no_grad():
        dense.fc_in.weight.copy_(experts.in_proj[0])
        dense.fc_out.weight.copy_(experts.out_proj[0])
        if expert_type == "gelu":
            dense.fc_in.bias.copy_(experts.in_bias[0])
            dense.fc_out.bias.copy_(experts.out_bias[0])
        else:
            assert dense.fc_in.bias is None and experts.in_bias is None
    torch.manual_seed(1)
    x = torch.randn(3, 5, DIM, dtype=F64)
    grad_out = torch.randn(3, 5, DIM, dtype=F64)
    out, gx, grads = run_layer(layer, x, 0, grad_out)
    xd = x.clone().requires_grad_(True)
    y = dense(xd)
    (y * grad_out).sum().backward()

    assert_close(out.hidden_states, y)
    assert_close(gx, xd.grad)
    assert_close(grads["experts.in_proj"][0], dense.fc_in.weight.grad)
    assert_close(grads["experts.out_proj"][0], dense.fc_out.weight.grad)
    if expert_type == "gelu":
        assert_close(grads["experts.in_bias"][0], dense.fc_in.bias.grad)
        assert_close(grads["experts.out_bias"][0], dense.fc_out.bias.grad)
    # A softmax over one expert is constant: the router gets no gradient from the output.
    assert_close(grads["router.weight"], torch.zeros_like(layer.router.weight))
    assert out.load.tolist() == [[1.0], [0.0]]


def test_shared_expert_adds_a_dense_mlp():
    layer = make_layer(num_experts=4, top_k=2, num_shared_experts=2)
    # The same router and experts without the shared expert (strict=False drops its weights).
    plain = make_layer(num_experts=4, top_k=2, num_shared_experts=0, seed=1)
    plain.load_state_dict(layer.state_dict(), strict=False)
    assert torch.equal(plain.router.weight, layer.router.weight)
    assert layer.shared_experts.fc_in.weight.shape == (2 * 2 * HIDDEN, DIM)  # two expert widths, gated
    x = torch.randn(2, 5, DIM, dtype=F64)
    assert_close(layer(x, 0), plain(x, 0) + layer.shared_experts(x))


# ------------------------------------------------------------------------- 3. upcycling


def _timm_mlp(act_layer=nn.GELU):
    from timm.layers import Mlp

    return Mlp(DIM, HIDDEN, act_layer=act_layer)


def _llama_mlp(bias: bool = False):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(LlamaConfig(hidden_size=DIM, intermediate_size=HIDDEN, hidden_act="silu", mlp_bias=bias, num_attention_heads=2))


DENSE_MLPS = {
    "timm_gelu": (_timm_mlp, "gelu"),
    "timm_gelu_tanh": (functools.partial(_timm_mlp, functools.partial(nn.GELU, approximate="tanh")), "gelu"),
    "llama": (_llama_mlp, "swiglu"),
    "llama_bias": (functools.partial(_llama_mlp, True), "swiglu"),
    "feedforward": (functools.partial(FeedForward, DIM, HIDDEN), "swiglu"),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("num_shared_experts", [0, 1])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dense_name", list(DENSE_MLPS))
def test_upcycled_layer_equals_dense_parent(dense_name, implementation, num_shared_experts, mode):
    build, expert_type = DENSE_MLPS[dense_name]
    torch.manual_seed(0)
    dense = build().to(F64)
    config = MoEConfig(
        **MODES[mode], top_k=2, modality_mode=mode, num_shared_experts=num_shared_experts,
        implementation=implementation, expert_type="gelu" if expert_type == "swiglu" else "swiglu",
    )
    layer = MoELayer.from_dense(dense, config)
    assert layer.config.expert_type == expert_type  # follows the dense MLP, not the config
    torch.manual_seed(1)
    x = torch.randn(2, 8, DIM, dtype=F64)
    grad_out = torch.randn(2, 8, DIM, dtype=F64)
    out, gx, _ = run_layer(layer, x, two_modalities(), grad_out)
    xd = x.clone().requires_grad_(True)
    y = dense(xd)
    (y * grad_out).sum().backward()
    # The router works in float32: the renormalised top-k weights sum to one up to float32 rounding.
    assert_close(out.hidden_states, y, atol=1e-6, rtol=1e-6)
    assert_close(gx, xd.grad, atol=1e-6, rtol=1e-6)

    # Not vacuous: perturbed experts no longer compute the dense MLP.
    noisy = MoELayer.from_dense(dense, config, noise_std=0.1)
    assert not torch.allclose(noisy.experts.in_proj[0], noisy.experts.in_proj[1])
    assert not torch.allclose(noisy(x, two_modalities()), y, atol=1e-4)


# ----------------------------------------------------------- 4. transformers' Mixtral block


def _mixtral(top_k: int, experts_implementation: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=32, intermediate_size=64, num_local_experts=4, num_experts_per_tok=top_k, router_jitter_noise=0.0
    )
    config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config)  # parameters are torch.empty: initialise them
    with torch.no_grad():
        block.gate.weight.normal_(std=0.5)
        block.experts.gate_up_proj.normal_(std=32**-0.5)
        block.experts.down_proj.normal_(std=64**-0.5)
    assert block.experts.config._experts_implementation == experts_implementation
    return block


def _layer_from_mixtral(block, implementation: str) -> MoELayer:
    config = MoEConfig(
        num_experts=4, top_k=block.top_k, expert_type="swiglu", normalize_top_k=True, implementation=implementation
    )
    layer = MoELayer(32, 64, config=config)
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight.unsqueeze(0))  # (1, E, D)
        layer.experts.in_proj.copy_(block.experts.gate_up_proj)  # (E, 2H, D), rows [gate; up]
        layer.experts.out_proj.copy_(block.experts.down_proj)  # (E, D, H)
    return layer


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("hf_implementation", ["eager", "grouped_mm", "batched_mm"])
def test_equals_transformers_mixtral_block(hf_implementation, implementation, top_k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    block = _mixtral(top_k, hf_implementation)
    layer = _layer_from_mixtral(block, implementation)
    torch.manual_seed(1)
    x = torch.randn(2, 7, 32)
    grad_out = torch.randn(2, 7, 32)

    out, gx, grads = run_layer(layer, x, 0, grad_out)
    xh = x.clone().requires_grad_(True)
    y = block(xh)
    (y * grad_out).sum().backward()
    tol = {"atol": 1e-5, "rtol": 1e-4}
    assert_close(out.hidden_states, y, **tol)
    assert_close(gx, xh.grad, **tol)
    assert_close(grads["router.weight"][0], block.gate.weight.grad, **tol)
    assert_close(grads["experts.in_proj"], block.experts.gate_up_proj.grad, **tol)
    assert_close(grads["experts.out_proj"], block.experts.down_proj.grad, **tol)

    # Load-balancing loss (single modality) and its gradient wrt the router.
    router_logits = block.gate(x.view(-1, 32))[0]
    assert_close(out.router_logits, router_logits, **tol)
    hf_loss = load_balancing_loss_func((router_logits,), 4, top_k)
    lb = layer.forward_with_aux(x, 0).load_balance_loss
    assert_close(lb, hf_loss, **tol)
    (g_ours,) = torch.autograd.grad(lb, layer.router.weight)
    (g_hf,) = torch.autograd.grad(hf_loss, block.gate.weight)
    assert_close(g_ours[0], g_hf, **tol)


@pytest.mark.parametrize("capacity_factor, capacity", [(None, 6), (0.5, 3), (2.0, 12), (10.0, 24)])
def test_expert_choice_capacity_and_selection(capacity_factor, capacity):
    """Each expert takes its ``min(T, ceil(capacity_factor * T * top_k / E))`` most probable positions."""
    layer = make_layer(num_experts=8, top_k=2, router="expert_choice", capacity_factor=capacity_factor)
    x = torch.randn(24, DIM, dtype=F64)
    r = layer.router(x, torch.zeros(24, dtype=torch.long))
    assert r.indices.shape == r.weights.shape == (8, capacity)
    for e in range(8):
        expected = r.probs[:, e].topk(capacity)
        assert torch.equal(r.weights[e], expected.values)
        assert set(r.indices[e].tolist()) == set(expected.indices.tolist())


@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0])
def test_token_choice_capacity_bounds_every_expert(capacity_factor):
    layer = make_layer(num_experts=4, top_k=2, capacity_factor=capacity_factor)
    with torch.no_grad():  # unbalanced on purpose: expert 0 is everyone's favourite
        layer.router.weight[0, 0] += 0.5
    x = torch.randn(20, DIM, dtype=F64)
    x[:, 0] = 1.0
    r = layer.router(x, torch.zeros(20, dtype=torch.long))
    dispatch, _, experts, dropped = layer.router.dispatch(r)
    capacity = math.ceil(capacity_factor * 20 * 2 / 4)
    assert max(dispatch.group_sizes) == capacity  # the favourite is full
    assert dispatch.group_sizes == [min(c, capacity) for c in torch.bincount(experts, minlength=4).tolist()]
    assert dropped.numel() == 40 - sum(dispatch.group_sizes) > 0


def test_built_on_meta_then_materialised_and_loaded():
    """Build on ``meta``, materialise, initialise, load a checkpoint: the same layer as the checkpoint's
    (the partition mask and per-modality expert counts follow from the config, not from buffers)."""
    config = MoEConfig(**PARTITION, top_k=2, modality_mode="partitioned")
    reference = MoELayer(DIM, HIDDEN, config=config)
    layer = MoELayer(DIM, HIDDEN, config=config, device="meta")
    layer.to_empty(device="cpu")
    for module in layer.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    layer.load_state_dict(reference.state_dict())
    x, modality = torch.randn(2, 8, DIM), two_modalities()
    out, expected = layer.forward_with_aux(x, modality), reference.forward_with_aux(x, modality)
    assert_close(out.hidden_states, expected.hidden_states, atol=0, rtol=0)
    assert_close(out.load, expected.load, atol=0, rtol=0)
    assert_close(out.load_balance_loss, expected.load_balance_loss, atol=0, rtol=0)


# ------------------------------------------------- 5. partitioned routing, per-modality stats


@pytest.mark.parametrize("present", ["both", "image_only"])
@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_partitioned_never_routes_to_other_modalities_experts(router, present):
    layer = make_layer(**PARTITION, top_k=2, modality_mode="partitioned", router=router)
    allowed = torch.tensor(layer.config.allowed_experts())  # (M, E)
    assert allowed.tolist() == [[True, True, False, True, True, True], [False, False, True, True, True, True]]
    torch.manual_seed(1)
    x = torch.randn(64, DIM, dtype=F64)
    # With images only, the text expert (2) has no position it may take: with expert choice it
    # still picks its top positions, all at probability zero, and none may reach it.
    modality = torch.randint(0, 2, (64,)) if present == "both" else torch.zeros(64, dtype=torch.long)

    r = layer.router(x, modality)
    dispatch, positions, experts, _ = layer.router.dispatch(r)
    assert torch.isinf(r.logits[~allowed[modality]]).all() and (r.probs[~allowed[modality]] == 0).all()
    expert_of = torch.repeat_interleave(torch.arange(6), torch.tensor(dispatch.group_sizes))
    assert allowed[modality[dispatch.token_idx], expert_of].all()
    assert allowed[modality[positions], experts].all()
    if router == "token_choice":
        assert allowed[modality[:, None], r.indices].all()
    out = layer.forward_with_aux(x, modality)
    assert (out.load[~allowed] == 0).all()
    assert (out.load[allowed] > 0).any()
    if present == "image_only":
        assert dispatch.group_sizes[2] == 0 and (out.load[1] == 0).all()
    assert_close(out.hidden_states, reference_forward(layer, x, modality)[0])

    # Not vacuous: the same router without the partition does use reserved experts across modalities.
    unmasked = clone_with(layer, modality_mode="shared", experts_per_modality=[])
    _, positions_u, experts_u, _ = unmasked.router.dispatch(unmasked.router(x, modality))
    assert not allowed[modality[positions_u], experts_u].all()


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
@pytest.mark.parametrize("mode", list(MODES))
def test_per_modality_load_statistics(mode, router):
    layer = make_layer(**MODES[mode], top_k=2, modality_mode=mode, router=router)
    torch.manual_seed(1)
    x = torch.randn(2, 8, DIM, dtype=F64)
    modality = two_modalities()
    out = layer.forward_with_aux(x, modality)
    flat = modality.reshape(-1)
    r = layer.router(x.reshape(-1, DIM), flat, 2)  # two sequences: expert choice picks in each

    num_experts = layer.config.num_experts
    counts = torch.zeros(2, num_experts, dtype=F64)
    if router == "token_choice":
        for t, row in enumerate(r.indices.tolist()):
            for e in row:
                counts[flat[t], e] += 1
    else:
        for e in range(num_experts):
            for t, w in zip(r.indices[e].tolist(), r.weights[e].tolist()):
                if w > 0:
                    counts[flat[t], e] += 1
    assert out.tokens.tolist() == torch.bincount(flat, minlength=2).tolist() == [7, 9]
    assert_close(out.load.double(), counts / counts.sum(-1, keepdim=True), atol=1e-7, rtol=0)
    assert_close(out.load.sum(-1).double(), torch.ones(2, dtype=F64), atol=1e-6, rtol=0)
    entropy = -(r.probs * r.probs.clamp(min=1e-30).log()).sum(-1)
    expected_entropy = torch.stack([entropy[flat == m].mean() for m in range(2)])
    assert_close(out.entropy, expected_entropy, atol=1e-6, rtol=1e-6)

    # Per-position modality matters in per_modality mode: the routers differ.
    if mode == "per_modality":
        r0 = layer.router(x.reshape(-1, DIM), torch.zeros_like(flat))
        r1 = layer.router(x.reshape(-1, DIM), torch.ones_like(flat))
        assert_close(r.logits, torch.where(flat[:, None] == 0, r0.logits, r1.logits))
        assert not torch.allclose(r0.logits, r1.logits)


@pytest.mark.parametrize("mode", list(MODES))
def test_per_modality_load_balance_equals_transformers(mode):
    """Each modality's loss is transformers' loss on its positions, over the experts it may use."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    layer = make_layer(**MODES[mode], top_k=2, modality_mode=mode, dtype=torch.float32)
    torch.manual_seed(1)
    x = torch.randn(2, 8, DIM)
    modality = two_modalities()
    out = layer.forward_with_aux(x, modality)
    flat = modality.reshape(-1)
    allowed = torch.tensor(layer.config.allowed_experts())
    expected = []
    for m in range(2):
        logits = out.router_logits[flat == m][:, allowed[m]]  # the experts modality m may use
        expected.append(load_balancing_loss_func((logits,), int(allowed[m].sum()), 2))
    expected = torch.stack(expected)
    assert_close(out.load_balance, expected, atol=1e-6, rtol=1e-5)
    assert_close(out.load_balance_loss, expected.mean(), atol=1e-6, rtol=1e-5)
    # The same gradient into the router (finite although partitioned logits hold -inf).
    (grad,) = torch.autograd.grad(out.load_balance_loss, layer.router.weight, retain_graph=True)
    (grad_expected,) = torch.autograd.grad(expected.mean(), layer.router.weight, retain_graph=True)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert_close(grad, grad_expected, atol=1e-6, rtol=1e-5)
    # z-loss: mean over positions of logsumexp over the experts each position may use, squared.
    lse = torch.stack([out.router_logits[t, allowed[flat[t]]].logsumexp(-1) for t in range(16)])
    assert_close(out.z_loss, lse.square().mean(), atol=1e-6, rtol=1e-6)
    (grad_z,) = torch.autograd.grad(out.z_loss, layer.router.weight)
    assert torch.isfinite(grad_z).all()

    # A modality absent from the batch: zero tokens, zero load, zero loss, and out of the mean.
    text_only = layer.forward_with_aux(x, 1)
    assert text_only.tokens.tolist() == [0, 16]
    assert (text_only.load[0] == 0).all() and text_only.load_balance[0] == 0
    assert_close(text_only.load_balance_loss, text_only.load_balance[1])


# ------------------------------------------------------------------- 6. known aux values


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_aux_losses_under_uniform_routing(mode, top_k):
    """Zero router weights: every allowed expert has the same probability, so (whatever ties
    top-k breaks to) the load-balance loss is sum_e f_e * n * (1/n) = top_k, the z-loss is
    log(n)^2 and the entropy log(n), with n the experts the modality may use."""
    layer = make_layer(**MODES[mode], top_k=top_k, modality_mode=mode)
    with torch.no_grad():
        layer.router.weight.zero_()
    modality = two_modalities()
    out = layer.forward_with_aux(torch.randn(2, 8, DIM, dtype=F64), modality)
    n = torch.tensor(layer.config.allowed_experts()).sum(-1).double()  # (M,)
    assert_close(out.load_balance.double(), torch.full((2,), float(top_k), dtype=F64), atol=1e-6, rtol=0)
    assert out.load_balance_loss.item() == pytest.approx(top_k, abs=1e-6)
    per_position = n[modality.reshape(-1)].log().square()
    assert out.z_loss.item() == pytest.approx(per_position.mean().item(), abs=1e-6)
    assert_close(out.entropy.double(), n.log(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("top_k, expected", [(1, 4 * 0.5), (2, 4 * (0.5 + 1 / 6))])
def test_aux_losses_under_collapsed_routing(top_k, expected):
    """Logits (log 3, 0, 0, 0) for every position: p = (1/2, 1/6, 1/6, 1/6); every position
    picks expert 0 (and, with top-2, one of the tied others), so the Switch loss is
    E * sum_e f_e p_e = 4 * (1 * 1/2 [+ 1 * 1/6]) and the z-loss log(6)^2."""
    layer = make_layer(num_experts=4, top_k=top_k)
    x = torch.randn(10, DIM, dtype=F64)
    x[:, 0] = 1.0
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0, 0] = math.log(3.0)
    out = layer.forward_with_aux(x, 0)
    assert_close(out.router_logits[:, 0], torch.full((10,), math.log(3.0), dtype=torch.float32))
    assert out.load_balance_loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.z_loss.item() == pytest.approx(math.log(6.0) ** 2, rel=1e-6)
    assert out.load[0, 0].item() == pytest.approx(1.0 / top_k)
    assert out.load[0].sum().item() == pytest.approx(1.0)
    # The weighted aux loss uses the config's weights.
    expected_aux = layer.config.aux_loss_weight * expected + layer.config.z_loss_weight * math.log(6.0) ** 2
    assert layer.aux_loss(out).item() == pytest.approx(expected_aux, rel=1e-6)


def test_jitter_noise_only_while_training():
    layer = make_layer(num_experts=4, top_k=2, jitter_noise=0.5)
    plain = clone_with(layer, jitter_noise=0.0)
    x = torch.randn(2, 8, DIM, dtype=F64)
    layer.eval()
    assert torch.equal(layer.forward_with_aux(x, 0).router_logits, plain.forward_with_aux(x, 0).router_logits)
    layer.train()
    assert not torch.allclose(layer.forward_with_aux(x, 0).router_logits, plain.forward_with_aux(x, 0).router_logits)


def test_dropout_only_while_training():
    torch.manual_seed(0)
    layer = MoELayer(DIM, HIDDEN, drop=0.5, config=MoEConfig(num_experts=4, top_k=2), dtype=F64)
    x = torch.randn(2, 8, DIM, dtype=F64)
    layer.eval()
    plain = layer(x, 0)
    layer.train()
    dropped = layer(x, 0)
    zero = dropped == 0
    assert 0 < zero.float().mean() < 1  # some features dropped, the others scaled by 1 / (1 - p)
    assert_close(dropped[~zero], plain[~zero] * 2)


# ------------------------------------------------------------------------------ 7. errors


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"expert_type": "relu"}, "expert_type"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"router": "hash"}, "router"),
        ({"modality_mode": "both"}, "modality_mode"),
        ({"implementation": "triton"}, "implementation"),
        ({"num_experts": 0}, "num_experts"),
        ({"modality_mode": "partitioned", "experts_per_modality": [2]}, "experts_per_modality"),
        ({"modality_mode": "partitioned", "num_experts": 4, "experts_per_modality": [3, 2]}, "experts_per_modality"),
        ({"modality_mode": "partitioned", "num_experts": 4, "top_k": 2, "experts_per_modality": [0, 3]},
         "experts_per_modality"),
        ({"experts_per_modality": [1, 1]}, "experts_per_modality"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**kwargs)


def test_expert_choice_refused_in_causal_layer():
    config = MoEConfig(num_experts=4, top_k=2, router="expert_choice")
    with pytest.raises(ValueError, match=r"moe\.router='expert_choice'.*causal"):
        MoELayer(DIM, HIDDEN, config=config, causal=True)
    MoELayer(DIM, HIDDEN, config=config, causal=False)  # fine in an encoder layer
    MoELayer(DIM, HIDDEN, config=MoEConfig(num_experts=4, top_k=2), causal=True)  # token choice is fine


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_capacity_factor_refused_in_causal_layer(router):
    """A capacity in a causal layer lets a later token drop an earlier one's assignment."""
    with pytest.raises(ValueError, match=r"moe\.capacity_factor=1\.0 is not allowed in a causal layer"):
        MoELayer(DIM, HIDDEN, config=MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0), causal=True)
    MoELayer(DIM, HIDDEN, config=MoEConfig(num_experts=4, top_k=2, router=router, capacity_factor=1.0), causal=False)


def test_layer_errors():
    with pytest.raises(ValueError, match="norm_layer"):
        MoELayer(DIM, HIDDEN, norm_layer=nn.LayerNorm, config=MoEConfig(num_experts=2, top_k=1))
    with pytest.raises(ValueError, match="act_layer"):
        MoELayer(DIM, HIDDEN, act_layer=nn.ReLU, config=MoEConfig(num_experts=2, top_k=1, expert_type="gelu"))
    with pytest.raises(ValueError, match="cannot upcycle"):
        MoELayer.from_dense(nn.Linear(DIM, DIM), MoEConfig(num_experts=2, top_k=1))
    with pytest.raises(ValueError, match="expert_type"):
        Experts(2, DIM, HIDDEN, expert_type="relu")


# ---------------------------------------------------------------------------- 8. timm ViT


def _vit(mlp_layer=None):
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {"mlp_layer": mlp_layer} if mlp_layer is not None else {}
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, **kwargs)


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_timm_vit_with_moe_layers(router):
    config = MoEConfig(num_experts=4, top_k=2, router=router, modality_mode="per_modality")
    model = _vit(functools.partial(MoELayer, config=config))
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(moe_layers) == 2
    images = torch.randn(2, 3, 32, 32)
    with moe_scope(model, 0) as records:
        features = model(images)
    assert features.shape == (2, 32) and torch.isfinite(features).all()
    assert len(records) == 2 and all(r.hidden_states.shape == (2, 17, 32) for r in records)
    loss = features.square().mean() + sum(layer.aux_loss(r) for layer, r in zip(moe_layers, records))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for layer in moe_layers:
        assert layer.router.weight.grad[0].abs().sum() > 0  # image router
        assert layer.router.weight.grad[1].abs().sum() == 0  # text router unused by images


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_upcycled_timm_vit_equals_dense_vit(implementation):
    dense = _vit()
    upcycled = _vit()
    upcycled.load_state_dict(dense.state_dict())
    config = MoEConfig(num_experts=4, top_k=2, implementation=implementation)
    for block in upcycled.blocks:
        block.mlp = MoELayer.from_dense(block.mlp, config)
    images = torch.randn(2, 3, 32, 32)
    with moe_scope(upcycled, 0):
        assert_close(upcycled(images), dense(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("mode", list(MODES))
def test_expert_choice_routes_each_sequence_alone(mode, capacity_factor):
    """Each expert picks its positions within each sequence: a sequence's output and routing are
    the same alone and in any batch (V-MoE's per-image capacity)."""
    layer = make_layer(
        **MODES[mode], top_k=2, modality_mode=mode, router="expert_choice", capacity_factor=capacity_factor
    )
    torch.manual_seed(1)
    x = torch.randn(4, 9, DIM, dtype=F64)
    modality = two_modalities(4, 9)
    batch = layer.forward_with_aux(x, modality)
    capacity = layer.router.capacity(9)
    assert batch.router_logits.shape == (36, layer.config.num_experts)
    for b in range(4):
        alone = layer.forward_with_aux(x[b : b + 1], modality[b : b + 1])
        assert_close(batch.hidden_states[b], alone.hidden_states[0])
        for other in ([b, (b + 1) % 4], [(b + 2) % 4, b]):  # other batch-mates, other places
            pair = layer(x[other], modality[other])
            assert_close(pair[other.index(b)], alone.hidden_states[0])
    # Every expert took ``capacity`` positions from each sequence.
    r = layer.router(x.reshape(-1, DIM), modality.reshape(-1), 4)
    picks = torch.stack([(r.indices // 9 == b).sum(-1) for b in range(4)])  # (B, E)
    assert (picks == capacity).all()


def test_expert_choice_vit_image_independent_of_its_batch():
    config = MoEConfig(num_experts=4, top_k=1, router="expert_choice", capacity_factor=0.5)
    model = _vit(functools.partial(MoELayer, config=config)).eval()
    images = torch.randn(3, 3, 32, 32)
    with moe_scope(model, 0):
        features = model(images)
        for i in range(3):
            torch.testing.assert_close(model(images[i : i + 1]), features[i : i + 1], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- 9. moe_scope


def _two_layer_model(mode="per_modality"):
    first = make_layer(num_experts=4, top_k=2, modality_mode=mode, seed=0)
    second = make_layer(num_experts=4, top_k=2, modality_mode=mode, seed=1)
    return nn.Sequential(first, nn.GELU(), second), first, second


def test_moe_scope_collects_and_routes_by_modality():
    model, first, second = _two_layer_model()
    x = torch.randn(2, 5, DIM, dtype=F64)
    expected = {m: second(F.gelu(first(x, m)), m) for m in (0, 1)}
    assert not torch.allclose(expected[0], expected[1])  # per_modality routers differ

    for m in (0, 1):
        with moe_scope(model, m) as records:
            y = model(x)
        assert_close(y, expected[m], atol=0, rtol=0)
        assert len(records) == 2
        assert_close(records[0].hidden_states, first(x, m), atol=0, rtol=0)
        assert_close(records[1].hidden_states, y, atol=0, rtol=0)
        assert records[0].tokens.tolist() == ([10, 0] if m == 0 else [0, 10])

    # Outside any scope: no modality, so a clear error, and nothing recorded.
    with pytest.raises(ValueError, match="modality"):
        model(x)
    assert len(records) == 2

    # A per-position modality tensor reaches the layers as it is.
    modality = two_modalities(2, 5)
    with moe_scope(model, modality) as records:
        y = model(x)
    assert_close(y, second(F.gelu(first(x, modality)), modality), atol=0, rtol=0)
    assert records[1].tokens.tolist() == torch.bincount(modality.reshape(-1)).tolist()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_one_modality_is_scored_by_its_router_alone(mode, router):
    """Positions of one modality (an int, or a tensor holding one value, padding aside) are routed by
    that modality's router alone, with the logits the per-position pick gives."""
    layer = make_layer(**MODES[mode], top_k=2, modality_mode=mode, router=router)
    x = torch.randn(2, 8, DIM, dtype=F64)
    for m in (0, 1):
        every = torch.full((2, 8), m)
        assert flat_modality(every, every.shape, x.device).single == m
        assert_close(layer.router.logits(x.view(16, DIM), m), layer.router.logits(x.view(16, DIM), every.view(-1)))
        alone = layer.forward_with_aux(x, m)
        assert_close(alone.hidden_states, layer(x, every))
        assert_close(alone.router_logits, layer.forward_with_aux(x, every).router_logits)
        if mode == "partitioned":  # another modality's experts stay out of reach
            blocked = ~torch.tensor(layer.config.allowed_experts()[m])
            assert alone.router_logits[:, blocked].eq(float("-inf")).all()
    # Which single modality a tensor holds: padding aside, none where two occur.
    mixed = two_modalities()
    assert flat_modality(mixed, mixed.shape, x.device).single is None
    assert flat_modality(_padded(torch.ones(2, 8, dtype=torch.long)), mixed.shape, x.device).single == 1
    assert flat_modality(torch.full((2, 8), PADDING), mixed.shape, x.device).single is None
    assert flat_modality(0, mixed.shape, x.device).single == 0


def test_moe_scope_nests_and_restores_on_error():
    model, first, second = _two_layer_model()
    x = torch.randn(2, 5, DIM, dtype=F64)
    y1 = second(F.gelu(first(x, 1)), 1)
    with moe_scope(model, 1) as outer:
        model(x)
        with moe_scope(model, 0) as inner:
            model(x)
        assert_close(model(x), y1, atol=0, rtol=0)  # the outer modality is back
    assert len(outer) == 4 and len(inner) == 2
    assert [r.tokens.tolist() for r in outer] == [[0, 10]] * 4
    assert [r.tokens.tolist() for r in inner] == [[10, 0]] * 2

    with pytest.raises(RuntimeError, match="boom"):
        with moe_scope(model, 1) as records:
            model(x)
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="modality"):  # the scope is gone
        model(x)
    assert len(records) == 2


def test_moe_scope_shared_layer_records_every_call():
    """One layer used twice (sharing across towers): one record per call, gradients from both."""
    layer = make_layer(num_experts=4, top_k=2)
    model = nn.Sequential(layer, nn.GELU(), layer)
    x = torch.randn(2, 5, DIM, dtype=F64)
    with moe_scope(model, 0) as records:
        y = model(x)
    assert len(records) == 2
    assert_close(records[0].hidden_states, layer(x, 0), atol=0, rtol=0)
    assert_close(y, layer(F.gelu(layer(x, 0)), 0), atol=0, rtol=0)
    assert len(list(model.parameters())) == len(list(layer.parameters()))
    # The shared parameters get the sum of both calls' gradients.
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    first, second = clone_with(layer), clone_with(layer)
    (second(F.gelu(first(x, 0)), 0) * grad_out).sum().backward()
    for (name, p), p1, p2 in zip(layer.named_parameters(), first.parameters(), second.parameters()):
        assert_close(p.grad, p1.grad + p2.grad, msg=name)


def test_moe_scope_reaches_a_layer_shared_through_shared_moe():
    """A decoder calling the encoder's layer through ``SharedMoE``: the scope reaches it, every
    call is recorded, the layer is listed once and saved once (by its owner)."""
    layer = make_layer(num_experts=4, top_k=2, modality_mode="per_modality")
    encoder = nn.Sequential(layer)
    decoder = nn.Sequential(nn.Identity(), SharedMoE(layer))
    model = nn.ModuleDict({"encoder": encoder, "decoder": decoder})
    assert moe_layers_of(model) == [layer] and moe_layers_of(decoder) == [layer]
    assert set(model.state_dict()) == {f"encoder.0.{k}" for k in layer.state_dict()}
    assert decoder.state_dict() == {}
    x = torch.randn(2, 5, DIM, dtype=F64)
    with moe_scope(decoder, 1) as records:
        y = decoder(x)
    assert len(records) == 1
    assert_close(y, layer(x, 1), atol=0, rtol=0)
    with moe_scope(model, 0) as records:
        encoder(x), decoder(x)
    assert len(records) == 2
    with moe_scope(decoder, 1):
        pass
    assert_close(decoder[1](x, 0), layer(x, 0), atol=0, rtol=0)  # an explicit modality passes through
    with pytest.raises(ValueError, match="modality"):  # outside the scope, none is given
        decoder(x)
    assert len(records) == 2  # and nothing recorded outside the scope


def test_layer_outside_a_scope_needs_a_modality():
    """No silent default: a layer called standalone is given its modality, or refuses."""
    layer = make_layer(num_experts=4, top_k=2, modality_mode="per_modality")
    x = torch.randn(2, 5, DIM, dtype=F64)
    for call in (layer, layer.forward_with_aux, SharedMoE(layer)):
        with pytest.raises(ValueError, match=r"modality.*layer\(x, modality\).*moe_scope"):
            call(x)
    with moe_scope(layer, 1):
        in_scope = layer(x)
    assert_close(layer(x, 1), in_scope, atol=0, rtol=0)
    assert_close(SharedMoE(layer)(x, 1), in_scope, atol=0, rtol=0)


# --------------------------------------------------------------------------- 10. padding


def _padded(modality: torch.Tensor) -> torch.Tensor:
    """The first sequence padded on the right, the second on the left."""
    modality = modality.clone()
    modality[0, -3:] = PADDING
    modality[1, :2] = PADDING
    return modality


@pytest.mark.parametrize("routing", ["token_dropless", "token_capacity"])
@pytest.mark.parametrize("mode", list(MODES))
def test_padding_reaches_no_expert_loss_or_statistic(mode, routing):
    """Padding positions route nowhere: the layer on a padded batch is the layer on its data
    positions alone (output, aux and z losses, every statistic, capacity), with 0 at padding."""
    router, capacity_factor = ROUTING[routing]
    layer = make_layer(**MODES[mode], top_k=2, modality_mode=mode, router=router, capacity_factor=capacity_factor)
    torch.manual_seed(1)
    x = torch.randn(2, 8, DIM, dtype=F64, requires_grad=True)
    modality = _padded(two_modalities())
    data = modality != PADDING
    padded = layer.forward_with_aux(x, modality)
    alone = layer.forward_with_aux(x[data], modality[data])
    assert_close(padded.hidden_states[data], alone.hidden_states)
    assert (padded.hidden_states[~data] == 0).all()
    for name in ("router_logits", "load_balance_loss", "z_loss", "load", "load_balance", "entropy", "dropped"):
        assert_close(getattr(padded, name), getattr(alone, name), msg=name)
    assert padded.tokens.tolist() == alone.tokens.tolist() == [5, 6]
    if capacity_factor is not None:
        assert alone.dropped.sum() > 0  # the capacity binds, and padding took none of it
    # Whatever padding holds changes nothing, and nothing flows back into it.
    (grad,) = torch.autograd.grad(padded.hidden_states.sum() + padded.load_balance_loss + padded.z_loss, x)
    assert (grad[~data] == 0).all()
    garbage = x.detach().masked_fill(~data[..., None], 1e3)
    assert_close(layer(garbage, modality), padded.hidden_states, atol=0, rtol=0)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_call_of_padding_only_adds_zero_losses(mode):
    """A call whose positions are all padding (a padded micro-batch) outputs zeros and adds 0 to
    the aux and z losses, not NaN (their means over no positions), and no gradient flows."""
    layer = make_layer(**MODES[mode], top_k=2, modality_mode=mode, num_shared_experts=1)
    x = torch.randn(2, 8, DIM, dtype=F64, requires_grad=True)
    out = layer.forward_with_aux(x, torch.full((2, 8), PADDING))
    assert (out.hidden_states == 0).all() and out.tokens.tolist() == [0, 0]
    assert out.load_balance_loss.item() == 0 and out.z_loss.item() == 0
    (grad,) = torch.autograd.grad(out.hidden_states.sum() + layer.aux_loss(out), x)
    assert (grad == 0).all()


HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "nonzero")


def count_host_reads(monkeypatch) -> list[str]:
    """Record every call of the Tensor methods that read device values on the host (a sync on CUDA)."""
    calls = []
    for name in HOST_READS:
        def reading(self, *args, _name=name, _method=getattr(torch.Tensor, name), **kwargs):
            calls.append(_name)
            return _method(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, reading)
    return calls


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "one_modality"])
@pytest.mark.parametrize("blocks", ["per_expert", "grouped_mm"])
def test_host_syncs_per_tower_forward(monkeypatch, blocks, padded):
    """A tower of MoE layers reads device values on the host once per forward to find the modalities
    present and once more to find padding where there is some (none for one int modality), and once
    per layer to walk the experts on CPU (none with grouped_mm, whose offsets stay on the device);
    losses and backward read none."""
    if blocks == "grouped_mm":
        if not hasattr(F, "grouped_mm"):
            pytest.skip("torch without grouped_mm")
        monkeypatch.setattr(experts_module, "_cpu_kernel", lambda *args: experts_module.KernelTrial("grouped_mm"))
    layers = [make_layer(dtype=torch.float32, num_experts=4, top_k=2, modality_mode="per_modality", seed=i)
              for i in range(3)]
    tower = nn.Sequential(*layers)
    x = torch.randn(2, 8, DIM, requires_grad=True)
    modality = _padded(two_modalities()) if padded else 1
    with moe_scope(tower, modality) as expected_records:
        expected = tower(x)
    calls = count_host_reads(monkeypatch)
    with moe_scope(tower, modality) as records:
        y = tower(x)
    forward_reads = list(calls)
    loss = y.sum() + sum(layer.aux_loss(r) for layer, r in zip(layers, records))
    loss.backward()
    monkeypatch.undo()
    per_layer = len(layers) if blocks == "per_expert" else 0
    assert forward_reads == ["tolist", "nonzero"] * padded + ["tolist"] * per_layer
    assert calls == forward_reads  # the losses and the backward read nothing
    assert_close(y, expected, atol=0, rtol=0)
    assert [r.tokens.tolist() for r in records] == [r.tokens.tolist() for r in expected_records]


def test_padding_refused_by_expert_choice():
    layer = make_layer(num_experts=4, top_k=2, router="expert_choice")
    with pytest.raises(ValueError, match="expert_choice.*padding"):
        layer(torch.randn(2, 8, DIM, dtype=F64), _padded(two_modalities()))


# ------------------------------------------------------------------ 11. dtypes and devices


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_bfloat16(expert_type, implementation, router):
    layer32 = make_layer(
        dtype=torch.float32, num_experts=4, top_k=2, expert_type=expert_type, implementation=implementation,
        router=router, num_shared_experts=1,
    )
    layer16 = clone_with(layer32, dtype=torch.bfloat16)
    layer32.load_state_dict(layer16.state_dict())  # float32 copies of the bfloat16 weights
    assert all(p.dtype == torch.bfloat16 for p in layer16.parameters())
    torch.manual_seed(1)
    x = torch.randn(2, 8, DIM).bfloat16()
    grad_out = torch.randn(2, 8, DIM)
    modality = two_modalities()

    out16, gx16, grads16 = run_layer(layer16, x, modality, grad_out.bfloat16())
    out32, gx32, grads32 = run_layer(layer32, x.float(), modality, grad_out)
    assert out16.hidden_states.dtype == torch.bfloat16 and gx16.dtype == torch.bfloat16
    assert out16.router_logits.dtype == torch.float32
    # The router runs in float32 on the same values: identical logits, hence identical routing.
    assert torch.equal(out16.router_logits, out32.router_logits)
    assert torch.equal(out16.load, out32.load)
    tol = {"atol": 3e-2, "rtol": 3e-2}
    assert_close(out16.hidden_states.float(), out32.hidden_states, **tol)
    assert_close(gx16.float(), gx32, **tol)
    for name, g in grads16.items():
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all(), name
        scale = grads32[name].abs().max().clamp(min=1e-3)
        assert_close(g.float() / scale, grads32[name] / scale, **tol, msg=name)


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_router_computes_in_float32_under_autocast(router):
    """bf16 autocast runs the experts in bf16 but not the router: the same float32 logits, routing
    and aux losses as without autocast."""
    layer = make_layer(dtype=torch.float32, num_experts=4, top_k=2, router=router)
    x, modality = torch.randn(2, 8, DIM), two_modalities()
    reference = layer.forward_with_aux(x, modality)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.forward_with_aux(x, modality)
    assert out.hidden_states.dtype == torch.bfloat16
    assert out.router_logits.dtype == torch.float32
    assert torch.equal(out.router_logits, reference.router_logits)
    for field in ("load", "load_balance_loss", "z_loss"):
        assert torch.equal(getattr(out, field), getattr(reference, field)), field


@pytest.mark.parametrize("positions", [1, 6])  # the straight path and the grouped kernel
@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_reused_casts_compute_what_casting_each_call_does(positions, expert_type):
    """Inside ``reused_casts()`` (no gradient, bf16 autocast) each expert parameter is cast once and kept
    while unchanged: the same output as casting each call's slices, bit for bit; an in-place change is
    cast again; with gradients the context changes nothing."""
    layer = make_layer(dtype=torch.float32, num_experts=4, top_k=2, expert_type=expert_type)
    x = torch.randn(positions, DIM)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(x, 1)
        with experts_module.reused_casts():
            first, again = layer(x, 1), layer(x, 1)
            kept = dict(experts_module._casts)
            experts_module.expert_weights(layer.experts.in_proj * 1, 0, torch.bfloat16)  # not a parameter: not kept
            assert experts_module._casts == kept
            layer.experts.in_proj.mul_(2)
            changed = layer(x, 1)
            assert len(experts_module._casts) == len(kept)  # the new cast replaced the old
        assert experts_module._casts is None
        expected_changed = layer(x, 1)
    assert torch.equal(first, expected) and torch.equal(again, expected)
    assert set(kept) == {id(p) for p in layer.experts.parameters()}  # each cast once, whole
    assert torch.equal(changed, expected_changed) and not torch.equal(changed, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16), experts_module.reused_casts():
        layer(x, 1).float().sum().backward()
    assert layer.experts.in_proj.grad is not None and layer.experts.in_proj.grad.abs().sum() > 0


@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_loop_and_grouped_agree_under_bf16_autocast(expert_type):
    """float32 weights and inputs under CPU bf16 autocast: both implementations compute in bf16 and
    agree; the float32 parameters get float32 gradients."""
    grouped = make_layer(dtype=torch.float32, num_experts=4, top_k=2, expert_type=expert_type)
    loop = clone_with(grouped, implementation="loop")
    x, grad_out = torch.randn(2, 40, DIM), torch.randn(2, 40, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_g, gx_g, grads_g = run_layer(grouped, x, two_modalities(2, 40), grad_out)
        out_l, gx_l, grads_l = run_layer(loop, x, two_modalities(2, 40), grad_out)
    assert out_g.hidden_states.dtype == out_l.hidden_states.dtype == torch.bfloat16
    tol = {"atol": 3e-2, "rtol": 3e-2}
    assert_close(out_g.hidden_states.float(), out_l.hidden_states.float(), **tol)
    assert_close(gx_g, gx_l, **tol)
    for name, g in grads_l.items():
        assert g.dtype == grads_g[name].dtype == torch.float32, name
        scale = g.abs().max().clamp(min=1e-3)
        assert_close(grads_g[name] / scale, g / scale, **tol, msg=name)


@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_grouped_backward_inside_autocast_after_a_float32_forward(expert_type):
    """A float32 forward (autocast off) whose backward is called inside a bf16 autocast region, as a
    trainer calls it: the experts' gradients are the ones computed outside the region (the backward's
    matmuls had turned bf16 and met float32 buffers: an error)."""
    layer = make_layer(dtype=torch.float32, num_experts=4, top_k=2, expert_type=expert_type)
    x, grad_out = torch.randn(2, 8, DIM), torch.randn(2, 8, DIM)
    grads = []
    for backward_in_autocast in (False, True):
        layer.zero_grad(set_to_none=True)
        out = layer(x.clone().requires_grad_(), two_modalities())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backward_in_autocast):
            (out * grad_out).sum().backward()
        grads.append([p.grad for p in layer.experts.parameters()])  # reached by the experts' backward only
    for outside, inside in zip(*grads):
        assert inside.dtype == torch.float32 and torch.equal(inside, outside)


def test_builds_on_meta_device():
    layer = MoELayer(DIM, HIDDEN, config=MoEConfig(num_experts=4, top_k=2, num_shared_experts=1), device="meta")
    assert all(p.device.type == "meta" for p in layer.parameters())
    assert set(layer.state_dict()) == {
        "router.weight", "experts.in_proj", "experts.out_proj",
        "shared_experts.fc_in.weight", "shared_experts.fc_out.weight",
    }
    # Routing reads values (which experts, how many rows): a forward on meta says so.
    with pytest.raises(ValueError, match="meta"):
        layer(torch.empty(2, 5, DIM, device="meta"), 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dim, hidden", [(64, 128), (18, 30)], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_grouped_equals_loop_on_cuda(expert_type, dtype, dim, hidden):
    torch.manual_seed(0)
    config = MoEConfig(num_experts=8, top_k=2, expert_type=expert_type, implementation="grouped")
    grouped = MoELayer(dim, hidden, config=config, device="cuda", dtype=dtype)
    loop = clone_with(grouped, implementation="loop")
    x = torch.randn(4, 32, dim, device="cuda", dtype=dtype)
    grad_out = torch.randn(4, 32, dim, device="cuda", dtype=dtype)
    out_g, gx_g, grads_g = run_layer(grouped, x, 0, grad_out)
    out_l, gx_l, grads_l = run_layer(loop, x, 0, grad_out)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    assert_close(out_g.hidden_states, out_l.hidden_states, **tol)
    assert_close(gx_g, gx_l, **tol)
    for name in grads_l:
        assert_close(grads_g[name], grads_l[name], **tol, msg=name)
