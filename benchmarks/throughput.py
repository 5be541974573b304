"""Training and captioning speed of the tiny MoE model against tiny-dense, side by side in one process.

    python benchmarks/throughput.py                      # CPU, float32, 2 threads
    python benchmarks/throughput.py --device cuda        # GPU, bf16 autocast

Models come from ``configs/tiny.yaml`` and ``configs/tiny-dense.yaml`` (random weights; the
tokenizer is trained on generated captions), inputs are shapes-set scenes drawn here, so nothing
needs to be downloaded or trained first. Each measurement is the median of ``--repeats`` after
warm-up, the models taking turns, so both see the same machine state.

- train step: forward, backward and AdamW step on a batch of ``--batch-size`` (half captions,
  half questions, as the demo mixes them).
- captioning: ``generate`` with the KV cache, greedy, exactly ``--new-tokens`` new tokens
  (EOS ignored, so both models do the same work), at batch 1 and batch 32.

Prints JSON: per model ``train_step_ms``, ``train_samples_per_s``, and per batch size
``caption_ms`` and ``caption_images_per_s``, and the MoE / dense ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_scripts.make_shapes import draw_scene, make_captions, make_questions, sample_scene  # noqa: E402
from vlmoe import build_model, train_tokenizer  # noqa: E402
from vlmoe.training.config import load_config  # noqa: E402
from vlmoe.training.optim import build_optimizer  # noqa: E402

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


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, with the core count."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{names[0] if names else platform.machine()} ({os.cpu_count()} cores)"


def build(config_path: str, tokenizer, device: torch.device):
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
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def rotate(jobs: dict[str, callable], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds of each job, the jobs taking turns."""
    for _ in range(warmup):
        for job in jobs.values():
            job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            times[name].append(timed(job, device))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    image_size = load_config(str(ROOT / MODELS["moe"])).model.vision.img_size
    data = scenes(max(args.batch_size, 32), image_size)
    tokenizer = train_tokenizer((t for _, c, q, a in scenes(2000, image_size, seed=1) for t in (c, q, a)), vocab_size=512)
    models = {name: build(path, tokenizer, device) for name, path in MODELS.items()}

    def train_step(model, optimizer, batch):
        def step():
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def caption(model, processor, batch):
        @torch.no_grad()
        def run():
            with autocast:
                model.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        return run

    for model, _, _ in models.values():
        model.train()
    train_ms = rotate({name: train_step(m, opt, training_batch(p, data[: args.batch_size], device))
                       for name, (m, p, opt) in models.items()}, args.repeats, args.warmup, device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
              "threads": args.threads if device.type == "cpu" else None,
              "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32", "torch": torch.__version__,
              "batch_size": args.batch_size, "new_tokens": args.new_tokens, "models": {}}
    for name, ms in train_ms.items():
        result["models"][name] = {"train_step_ms": round(ms, 2), "train_samples_per_s": round(args.batch_size * 1000 / ms, 1)}
    for model, _, _ in models.values():
        model.eval()
    for batch_size in (1, 32):
        caption_ms = rotate({
            name: caption(m, p, {k: v.to(device) for k, v in p.generation_batch(
                [image for image, *_ in data[:batch_size]], [p.prompt(None)] * batch_size).items()})
            for name, (m, p, _) in models.items()
        }, args.repeats, args.warmup, device)
        for name, ms in caption_ms.items():
            result["models"][name][f"caption_ms_batch{batch_size}"] = round(ms, 2)
            result["models"][name][f"caption_images_per_s_batch{batch_size}"] = round(batch_size * 1000 / ms, 1)
    moe, dense = result["models"]["moe"], result["models"]["dense"]
    result["moe_vs_dense"] = {key: round(moe[key] / dense[key], 3) for key in moe if key.endswith("_ms") or "_ms_" in key}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
