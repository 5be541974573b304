"""Training and captioning speed of the tiny MoE model against tiny-dense, side by side in one process.

    python benchmarks/throughput.py                              # CPU, float32, 2 threads
    python benchmarks/throughput.py --dtype float32 bfloat16     # CPU, bf16 autocast beside fp32
    python benchmarks/throughput.py --compile                    # + torch.compile'd train steps
    python benchmarks/throughput.py --device cuda                # GPU, bf16 autocast
    python benchmarks/throughput.py --markdown docs/results/throughput_cpu_amd_epyc_avx2_<commit>.json  # README table

Models come from ``configs/tiny.yaml`` and ``configs/tiny-dense.yaml`` (random weights; the
tokenizer is trained on generated prompts, captions and answers, as a run is), inputs are
shapes-set scenes drawn here, so nothing needs to be downloaded or trained first. Each
measurement is the median of ``--repeats`` after warm-up, the models taking turns, so both see
the same machine state.

- train step: forward, backward and AdamW step on a batch of ``--batch-size`` (half captions,
  half single questions; the demo's batches hold a third captions and two thirds conversations
  of three questions, so its steps are longer).
- captioning: ``generate`` with the KV cache, greedy, exactly ``--new-tokens`` new tokens
  (EOS ignored, so both models do the same work), at batch 1 and batch 32. Then, in runs of their
  own (hooks around each call cost a little), the time spent inside the decoder's MLP slots, the
  dense MLP or the MoE layer (``caption_decoder_mlp_ms_batch*``; host time, so on CUDA the
  launches): what the MoE adds is there.

- ``--dtype``: ``float32``, or ``bfloat16`` autocast (weights and AdamW stay float32); each
  dtype is measured in turn in this process, its models taking turns as above.
- ``--compile``: a ``torch.compile``'d copy of each model (same seed, own optimizer) takes turns
  with the eager one in the train step; warm-up includes the compilation. vlmoe's expert
  computation runs eagerly inside the compiled model (its group sizes are data-dependent;
  ``Experts.forward`` is excluded from compilation), and the model's other data-dependent
  steps (padding lookup, image-token count) are graph breaks. Captioning is timed eagerly only.

On CPU, each allocator setting (``benchmarks/machine.py``: glibc's default; ``reuse``, glibc keeping
freed memory; ``thp``, transparent huge pages where the kernel allows them) runs in a child process
of its own, as in ``benchmarks/moe_layer.py``: the models' intermediates are megabytes, fresh pages
to fault in on every step under glibc's default, and the two models allocate differently, so a
ratio can move with the setting. Ratios are taken within one process, never across settings.

Prints a JSON list, one record per allocator setting: machine fields (``allocator`` among them),
then per dtype, per model its ``parameters``, ``train_step_ms``
(and the medians of its parts, ``train_forward_ms``, ``train_backward_ms``,
``train_optimizer_ms``: AdamW's time follows the parameters, all experts', not the active ones),
``train_samples_per_s`` (with ``--compile``: ``train_step_ms_compiled`` and the compiled / eager
ratio), and per batch size ``caption_ms`` and ``caption_images_per_s``; the MoE / dense ratios of
the medians (``moe_vs_dense``) and the quartiles of the ratio taken within each round
(``moe_vs_dense_per_round``: the models alternate, so a drift of the machine between rounds
cancels, and the spread says how far one figure can be trusted); on CPU, the expert kernel each
kernel class kept (``cpu_kernels``; the walk or grouped_mm change a MoE figure by up to a tenth).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import ALLOCATORS, available_allocators, clock, describe, run_per_allocator  # noqa: E402
from data_scripts.make_shapes import draw_scene, make_captions, make_questions, sample_scene  # noqa: E402
from vlmoe import build_model, train_tokenizer  # noqa: E402
from vlmoe.model.towers import decoder_layers  # noqa: E402
from vlmoe.moe.experts import chosen_kernels  # noqa: E402
from vlmoe.training.config import load_config  # noqa: E402
from vlmoe.training.optim import build_optimizer  # noqa: E402
from vlmoe.training.trainer import tokenizer_texts  # noqa: E402

MODELS = {"moe": "configs/tiny.yaml", "dense": "configs/tiny-dense.yaml"}


def scenes(count: int, image_size: int, seed: int = 0) -> list[tuple]:
    """``count`` (image, caption, question, answer) from the shapes-set generator."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        shapes = sample_scene(rng, image_size)
        [(_, question, answer)] = make_questions(shapes, rng, image_size, count=1)
        out.append((draw_scene(shapes, image_size), make_captions(shapes, image_size)[0], question, answer))
    return out


def build(config_path: str, tokenizer, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)  # so that a compiled copy starts from the eager model's weights
    config = load_config(str(ROOT / config_path))
    model, processor = build_model(config.model.to_vlmoe_config(), tokenizer)
    return model.to(device), processor, build_optimizer(model, config.optim)


def training_batch(processor, samples: list[tuple], device: torch.device) -> dict[str, torch.Tensor]:
    half = len(samples) // 2  # captions, then questions
    prompts = [processor.prompt(None)] * half + [processor.prompt(q) for _, _, q, _ in samples[half:]]
    targets = [c for _, c, _, _ in samples[:half]] + [a for _, _, _, a in samples[half:]]
    batch = processor.training_batch([image for image, *_ in samples], prompts, targets)
    return {k: v.to(device) for k, v in batch.items()}


def timed(fn, device: torch.device) -> float:
    start = clock(device)
    fn()
    return (clock(device) - start) * 1000


def rotate(jobs: dict[str, callable], repeats: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Milliseconds of each job in each round, the jobs taking turns."""
    for _ in range(warmup):
        for job in jobs.values():
            job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            times[name].append(timed(job, device))
    return times


def per_round_ratio(times: dict[str, list[float]]) -> dict[str, float]:
    """Quartiles of MoE / dense taken within each round: the machine's drift between rounds cancels."""
    ratios = [moe / dense for moe, dense in zip(times["moe"], times["dense"])]
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"q1": round(q1, 3), "median": round(median, 3), "q3": round(q3, 3)}


def time_inside(modules: list[torch.nn.Module], run) -> float:
    """Milliseconds ``run()`` spends inside calls of ``modules`` (forward hooks around each call)."""
    spent, starts = [0.0], []

    def enter(*_):
        starts.append(time.perf_counter())

    def leave(*_):
        spent[0] += time.perf_counter() - starts.pop()

    handles = [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return spent[0] * 1000


def autocast_for(device: torch.device, dtype: str):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=4,
                        help="rounds before timing (4: each CPU kernel class of the tiny models, called 4 or more "
                             "times a round, ends its kernel trials, TRIAL_CALLS calls)")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"],
                        help="float32 or bfloat16 autocast, each in turn (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd train steps (experts stay eager: data-dependent group sizes)")
    parser.add_argument("--allocator", nargs="+", choices=list(ALLOCATORS),
                        help="CPU allocator settings, one child process each (default: every one this machine has)")
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process, under the allocator it started with (what each child runs)")
    parser.add_argument("--markdown", metavar="JSON", help="print the README table of a saved run, measure nothing")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text())))
        return
    if args.allocator and args.device != "cpu":
        parser.error(f"--allocator: the allocator settings are the CPU's, not --device {args.device}'s")
    if args.in_process or args.device != "cpu":
        records = [measure_all(args)]
    else:
        child_argv = ["--threads", str(args.threads), "--batch-size", str(args.batch_size), "--new-tokens",
                      str(args.new_tokens), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                      *(["--dtype", *args.dtype] if args.dtype else []), *(["--compile"] if args.compile else []),
                      "--in-process"]
        records = run_per_allocator(__file__, child_argv, args.allocator or available_allocators())
    print(json.dumps(records, indent=1))


def measure_all(args: argparse.Namespace) -> dict:
    """This process's record: every dtype, under the allocator it started with."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = args.dtype or (["bfloat16"] if device.type == "cuda" else ["float32"])

    model_config = load_config(str(ROOT / MODELS["moe"])).model
    image_size = model_config.vision.img_size
    data = scenes(max(args.batch_size, 32), image_size)
    # Prompts and targets as a run of the config reads them, so that sequences are as long as in training.
    texts = [sample for _, c, q, a in scenes(2000, image_size, seed=1) for sample in ((None, [c]), (q, [a]))]
    tokenizer = train_tokenizer(tokenizer_texts(model_config, texts), vocab_size=512)
    result = {**describe(args.threads if device.type == "cpu" else None),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "batch_size": args.batch_size, "new_tokens": args.new_tokens, "by_dtype": {}}
    for dtype in dtypes:
        result["by_dtype"][dtype] = measure(args, device, dtype, tokenizer, data)
    return result


def measure(args: argparse.Namespace, device: torch.device, dtype: str, tokenizer, data: list[tuple]) -> dict:
    """One dtype's figures: train steps (eager, and compiled with ``--compile``) and captioning."""
    autocast = autocast_for(device, dtype)
    if args.compile:
        torch._dynamo.reset()  # a fresh start per dtype: the last dtype's graphs would count against recompile limits
    models = {name: build(path, tokenizer, device) for name, path in MODELS.items()}

    phases = {}  # job -> per call: forward, backward, optimizer milliseconds

    def train_step(model, optimizer, batch, name):
        def step():
            marks = [clock(device)]
            with autocast:
                loss = model(**batch).loss
            marks.append(clock(device))
            loss.backward()
            marks.append(clock(device))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            marks.append(clock(device))
            phases.setdefault(name, []).append([(b - a) * 1000 for a, b in zip(marks, marks[1:])])
        return step

    def caption(model, processor, batch):
        @torch.no_grad()
        def run():
            with autocast:
                model.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        return run

    jobs = {}
    for name, (model, processor, optimizer) in models.items():
        model.train()
        batch = training_batch(processor, data[: args.batch_size], device)
        jobs[name] = train_step(model, optimizer, batch, name)
        if args.compile:
            copy, _, copy_optimizer = build(MODELS[name], tokenizer, device)
            jobs[f"{name}_compiled"] = train_step(torch.compile(copy.train()), copy_optimizer, batch, f"{name}_compiled")
    train_times = rotate(jobs, args.repeats, args.warmup, device)
    train_ms = {name: statistics.median(t) for name, t in train_times.items()}
    out = {"dtype": "float32" if dtype == "float32" else "bfloat16 autocast (float32 weights)", "models": {},
           "moe_vs_dense_per_round": {"train_step_ms": per_round_ratio(train_times)}}
    for name in models:
        ms = train_ms[name]
        samples_per_s = round(args.batch_size * 1000 / ms, 1)
        parameters = sum(p.numel() for p in models[name][0].parameters())
        out["models"][name] = {"parameters": parameters, "train_step_ms": round(ms, 2), "train_samples_per_s": samples_per_s}
        for phase, times in zip(("forward", "backward", "optimizer"), zip(*phases[name][-args.repeats:])):
            out["models"][name][f"train_{phase}_ms"] = round(statistics.median(times), 2)
        if args.compile:
            compiled = train_ms[f"{name}_compiled"]
            out["models"][name]["train_step_ms_compiled"] = round(compiled, 2)
            out["models"][name]["compiled_vs_eager"] = round(compiled / ms, 3)
    for model, _, _ in models.values():
        model.eval()
    for batch_size in (1, 32):
        captions = {
            name: caption(m, p, {k: v.to(device) for k, v in p.generation_batch(
                [image for image, *_ in data[:batch_size]], [p.prompt(None)] * batch_size).items()})
            for name, (m, p, _) in models.items()
        }
        caption_times = rotate(captions, args.repeats, args.warmup, device)
        caption_ms = {name: statistics.median(t) for name, t in caption_times.items()}
        out["moe_vs_dense_per_round"][f"caption_ms_batch{batch_size}"] = per_round_ratio(caption_times)
        mlps = {name: [layer.mlp for layer in decoder_layers(m.language_model)] for name, (m, _, _) in models.items()}
        mlp_ms = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, run in captions.items():
                mlp_ms[name].append(time_inside(mlps[name], run))
        for name, ms in caption_ms.items():
            out["models"][name][f"caption_ms_batch{batch_size}"] = round(ms, 2)
            out["models"][name][f"caption_images_per_s_batch{batch_size}"] = round(batch_size * 1000 / ms, 1)
            out["models"][name][f"caption_decoder_mlp_ms_batch{batch_size}"] = round(statistics.median(mlp_ms[name]), 2)
    moe, dense = out["models"]["moe"], out["models"]["dense"]
    out["moe_vs_dense"] = {key: round(moe[key] / dense[key], 3) for key in moe if key.endswith("_ms") or "_ms_" in key}
    if device.type == "cpu":
        out["cpu_kernels"] = chosen_kernels()
    return out


def markdown_table(records: list[dict]) -> str:
    """The README's table of MoE / dense, per allocator setting and dtype, from a saved run."""
    first = records[0]
    lines = [
        f"{first['cpu']} (family/model {first['cpu_family_model']}; {' '.join(first['isa']) or 'no listed ISA flags'}), "
        f"torch {first['torch']}, "
        f"{first['threads']} threads, batch {first['batch_size']}, {first['new_tokens']} new tokens; "
        "MoE / dense, median of the per-round ratios (quartiles):",
        "",
        "| allocator | dtype | train step ms, MoE / dense | train step | captioning, batch 1 | captioning, batch 32 |",
        "|---|---|---|---|---|---|",
    ]
    for record in records:
        for dtype, figures in record["by_dtype"].items():
            moe, dense = figures["models"]["moe"], figures["models"]["dense"]
            cells = [record["allocator"], dtype, f"{moe['train_step_ms']:.0f} / {dense['train_step_ms']:.0f}"]
            for key in ("train_step_ms", "caption_ms_batch1", "caption_ms_batch32"):
                q = figures["moe_vs_dense_per_round"][key]
                cells.append(f"{q['median']:.2f} ({q['q1']:.2f}-{q['q3']:.2f})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
