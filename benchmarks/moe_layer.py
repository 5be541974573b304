"""MoE layer speed against the dense FFN of equal active FLOPs and transformers' MoE block.

    python benchmarks/moe_layer.py                            # a table, every allocator setting
    python benchmarks/moe_layer.py --json                     # a list of {"shape", "impl", "fwd_ms", ...}
    python benchmarks/moe_layer.py --dtype float32 bfloat16   # bf16 figures beside fp32
    python benchmarks/moe_layer.py --allocator glibc --shapes D1 --repeats 3
    python benchmarks/moe_layer.py --markdown docs/results/moe_layer_cpu_amd_epyc.json   # README table
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --json                # on a GPU

Every implementation gets the same weights and inputs and is timed in rotation in one process
(2 threads by default): forward under ``no_grad`` and forward+backward, median over
``--repeats`` rounds after warm-up (first vlmoe's layer alone, until its CPU kernel trials end, so
that the rounds run the kernels it keeps). Each allocator setting (``benchmarks/machine.py``: glibc's
default; ``reuse``, glibc keeping freed memory; ``thp``, transparent huge pages where the
kernel allows them) runs in its own child process, since the allocator reads its settings at
start-up; ratios are taken within one process, never across settings. ``bfloat16`` casts
weights, inputs and output gradients to bf16 (no autocast; vlmoe's router still computes in
float32). Every record carries the allocator setting, dtype, CPU model, ISA flags, torch
version and thread count; on CPU, vlmoe's record also the expert kernel each of its kernel
classes kept (``cpu_kernels``). ``dense`` is a SwiGLU FFN of hidden width
``top_k * ffn``: the same FLOPs per token as the MoE's active experts, the limit a MoE layer
is measured against. ``hf_<impl>`` is transformers' ``MixtralSparseMoeBlock`` with each experts
implementation that runs on this device. Each record also gives the active TFLOP/s (the experts'
matmuls at ``top_k`` experts per token, forward; three times that for forward+backward), the
dense FFN's being the same FLOPs: vlmoe's share of dense TFLOP/s is ``1 / fwd_vs_dense``. On a
GPU (``--device cuda``) everything runs in this process and each timing waits for the device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import ALLOCATORS, available_allocators, clock, describe, run_per_allocator  # noqa: E402
from vlmoe.model.modeling import TEXT  # noqa: E402
from vlmoe.moe import FeedForward, MoEConfig, MoELayer  # noqa: E402
from vlmoe.moe.experts import TRIAL_CALLS, chosen_kernels  # noqa: E402

SHAPES = {  # name: (d, ffn, experts, top_k, tokens)
    "S1": (384, 1536, 8, 2, 4096),
    "S2": (768, 3072, 8, 2, 2048),
    "S3": (256, 1024, 16, 1, 8192),
    "D1": (384, 1536, 8, 2, 8),
}
HF_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TextPositions(torch.nn.Module):
    """A MoE layer called on its own: every position is text (a layer needs each position's modality)."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, TEXT)


def build_variants(d: int, ffn: int, experts: int, top_k: int) -> dict[str, torch.nn.Module]:
    config = MoEConfig(num_experts=experts, top_k=top_k, expert_type="swiglu")
    vlmoe = MoELayer(d, ffn, config=config)
    loop = MoELayer(d, ffn, config=MoEConfig(**{**vars(config), "implementation": "loop"}))
    loop.load_state_dict(vlmoe.state_dict())
    variants = {
        "vlmoe": TextPositions(vlmoe), "vlmoe_loop": TextPositions(loop),
        "dense": FeedForward(d, top_k * ffn, expert_type="swiglu"),
    }
    for impl in HF_IMPLEMENTATIONS:
        hf_config = MixtralConfig(
            hidden_size=d, intermediate_size=ffn, num_local_experts=experts, num_experts_per_tok=top_k,
            router_jitter_noise=0.0,
        )
        hf_config._experts_implementation = impl
        block = MixtralSparseMoeBlock(hf_config)
        with torch.no_grad():
            block.gate.weight.copy_(vlmoe.router.weight[0])
            block.experts.gate_up_proj.copy_(vlmoe.experts.in_proj)
            block.experts.down_proj.copy_(vlmoe.experts.out_proj)
        variants[f"hf_{impl}"] = block
    return variants


def runs_here(name: str, module: torch.nn.Module, x: torch.Tensor, top_k: int, max_gb: float = 4.0) -> bool:
    """False for an implementation this device lacks, or one too big for this shape:
    ``hf_batched_mm`` gathers a copy of the expert weights per token-expert pair (17-150 GB at
    S1-S3), so it only runs where that copy fits in ``max_gb``."""
    if name == "hf_batched_mm":
        pair_bytes = x.shape[1] * top_k * sum(p[0].numel() for p in module.experts.parameters()) * x.element_size()
        if pair_bytes > max_gb * 2**30:
            return False
    try:
        module(x.clone().requires_grad_()).sum().backward()
        module.zero_grad(set_to_none=True)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def timed(fn: Callable[[], None], inner: int, device: torch.device) -> float:
    start = clock(device)
    for _ in range(inner):
        fn()
    return (clock(device) - start) * 1e3 / inner


def active_tflop(name: str) -> float:
    """TFLOP of one forward through the active experts (SwiGLU: three ``d x ffn`` matmuls per expert)."""
    d, ffn, _, top_k, tokens = SHAPES[name]
    return 6 * d * ffn * top_k * tokens / 1e12


def bench_shape(name: str, repeats: int, warmup: int, dtype: str = "float32", device: str = "cpu") -> list[dict]:
    d, ffn, experts, top_k, tokens = SHAPES[name]
    device = torch.device(device)
    torch.manual_seed(0)
    variants = {k: m.to(device, DTYPES[dtype]) for k, m in build_variants(d, ffn, experts, top_k).items()}
    x = torch.randn(1, tokens, d, dtype=DTYPES[dtype], device=device)
    grad = torch.randn(1, tokens, d, dtype=DTYPES[dtype], device=device)
    earlier = set(chosen_kernels())  # the kernel classes of shapes measured before
    variants = {k: m for k, m in variants.items() if runs_here(k, m, x, top_k)}

    def fwd(module):
        with torch.no_grad():
            module(x)

    def fwd_bwd(module):
        xg = x.clone().requires_grad_()
        module(xg).backward(grad)
        module.zero_grad(set_to_none=True)

    inner = max(1, round(20 / max(timed(lambda: fwd(variants["dense"]), 3, device), 1e-3)))  # >= ~20 ms a sample
    for _ in range(TRIAL_CALLS + 1):  # each of vlmoe's two kernel classes (forward, forward+backward)
        fwd(variants["vlmoe"])
        fwd_bwd(variants["vlmoe"])
    for _ in range(warmup):
        for module in variants.values():
            fwd(module)
            fwd_bwd(module)
    times = {k: {"fwd": [], "fwd_bwd": []} for k in variants}
    for _ in range(repeats):  # rotation: every variant once per round
        for key, module in variants.items():
            times[key]["fwd"].append(timed(lambda: fwd(module), inner, device))
            times[key]["fwd_bwd"].append(timed(lambda: fwd_bwd(module), inner, device))
    med = {k: {p: statistics.median(v) for p, v in t.items()} for k, t in times.items()}
    kernels = {key: kernel for key, kernel in chosen_kernels().items() if key not in earlier}
    return [
        {
            "shape": name, "dtype": dtype, "impl": key,
            "fwd_ms": round(m["fwd"], 4), "fwd_bwd_ms": round(m["fwd_bwd"], 4),
            "fwd_vs_dense": round(m["fwd"] / med["dense"]["fwd"], 3),
            "fwd_bwd_vs_dense": round(m["fwd_bwd"] / med["dense"]["fwd_bwd"], 3),
            "fwd_tflops": round(active_tflop(name) / (m["fwd"] / 1e3), 4),
            "fwd_bwd_tflops": round(3 * active_tflop(name) / (m["fwd_bwd"] / 1e3), 4),
            **({"cpu_kernels": kernels} if key == "vlmoe" and kernels else {}),
        }
        for key, m in med.items()
    ]


def summary(records: list[dict]) -> dict:
    """The figures the MoE layer is held to, per allocator setting and dtype (``ALLOC/DTYPE/KEY``)."""
    out = {}
    for group in sorted({(r["allocator"], r["dtype"]) for r in records}):
        mine = [r for r in records if (r["allocator"], r["dtype"]) == group]
        out.update({f"{group[0]}/{group[1]}/{key}": value for key, value in _summary(mine).items()})
    return out


def _summary(records: list[dict]) -> dict:
    """The figures of one process's records (one allocator setting, one dtype)."""
    by = {(r["shape"], r["impl"]): r for r in records}
    shapes = sorted({r["shape"] for r in records})
    train = [s for s in shapes if s.startswith("S")]
    out = {}
    if train:
        ratios = [by[(s, "vlmoe")]["fwd_bwd_vs_dense"] for s in train]
        out["vlmoe_fwd_bwd_vs_dense_geomean_S"] = round(statistics.geometric_mean(ratios), 3)
    for s in shapes:
        hf = [r for r in records if r["shape"] == s and r["impl"].startswith("hf_")]
        if not hf:
            continue
        best_hf = min(hf, key=lambda r: r["fwd_bwd_ms"])
        best_hf_fwd = min(hf, key=lambda r: r["fwd_ms"])
        out[f"{s}_vlmoe_vs_best_hf_fwd_bwd"] = round(by[(s, "vlmoe")]["fwd_bwd_ms"] / best_hf["fwd_bwd_ms"], 3)
        out[f"{s}_vlmoe_vs_best_hf_fwd"] = round(by[(s, "vlmoe")]["fwd_ms"] / best_hf_fwd["fwd_ms"], 3)
    return out


def measure(args: argparse.Namespace) -> list[dict]:
    """This process's records: every shape and dtype under the allocator it started with (on a GPU,
    the device's name in place of the allocator setting)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = describe(args.threads)
    if device.type == "cuda":
        machine |= {"allocator": device.type, "device": torch.cuda.get_device_name(device)}
    return [
        {**r, **machine}
        for dtype in args.dtype for name in args.shapes
        for r in bench_shape(name, args.repeats, args.warmup, dtype, args.device)
    ]


def print_table(records: list[dict]) -> None:
    r0 = records[0]
    print(f"# torch {r0['torch']}, {r0['cpu']} ({' '.join(r0['isa'])}), {r0['threads']} threads")
    print(f"{'alloc':6} {'dtype':9} {'shape':6} {'impl':16} {'fwd_ms':>10} {'fwd_bwd_ms':>11} {'fwd/dense':>10} "
          f"{'fwd_bwd/dense':>14}")
    for r in records:
        print(
            f"{r['allocator']:6} {r['dtype']:9} {r['shape']:6} {r['impl']:16} {r['fwd_ms']:10.3f} "
            f"{r['fwd_bwd_ms']:11.3f} {r['fwd_vs_dense']:10.3f} {r['fwd_bwd_vs_dense']:14.3f}"
        )
    print(json.dumps(summary(records), indent=1))


def markdown_table(records: list[dict]) -> str:
    """The README's table of vlmoe against dense and transformers' best, from saved ``--json`` records."""
    lines = [
        "| allocator | dtype | shape | d / ffn / E / k / tokens | vlmoe fwd+bwd ms | / dense | / best hf_* "
        "| vlmoe fwd ms | / dense | / best hf_* |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["allocator"], r["dtype"], r["shape"], r["impl"]): r for r in records}
    for (allocator, dtype, shape, impl), r in by.items():
        if impl != "vlmoe":
            continue
        hf = [h for (a, t, s, i), h in by.items() if (a, t, s) == (allocator, dtype, shape) and i.startswith("hf_")]
        cells = [allocator, dtype, shape, " / ".join(map(str, SHAPES[shape]))]
        for key in ("fwd_bwd_ms", "fwd_ms"):
            best = min(hf, key=lambda h: h[key])
            ratio = key.replace("_ms", "_vs_dense")
            cells += [f"{r[key]:.1f}", f"{r[ratio]:.2f}", f"{r[key] / best[key]:.2f} ({best['impl']})"]
        lines.append("| " + " | ".join(cells) + " |")
    means = summary(records)
    lines.append("")
    lines.append("Geometric mean of fwd+bwd / dense over S1-S3: " + ", ".join(
        f"{key.split('/')[0]} {key.split('/')[1]} {value:.2f}"
        for key, value in means.items() if key.endswith("vlmoe_fwd_bwd_vs_dense_geomean_S")
    ) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: one process, no allocator settings")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=list(DTYPES))
    parser.add_argument("--allocator", nargs="+", default=available_allocators(), choices=list(ALLOCATORS),
                        help="allocator settings, one child process each (default: every one this machine has)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process, under the allocator it started with (what each child runs)")
    parser.add_argument("--markdown", metavar="JSON", help="print the README table of saved --json records, measure nothing")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text())))
        return
    if args.in_process or args.device != "cpu":
        records = measure(args)
    else:
        child_argv = ["--shapes", *args.shapes, "--dtype", *args.dtype, "--repeats", str(args.repeats),
                      "--warmup", str(args.warmup), "--threads", str(args.threads), "--in-process", "--json"]
        records = run_per_allocator(__file__, child_argv, args.allocator)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print_table(records)


if __name__ == "__main__":
    main()
