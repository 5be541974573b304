"""The equal-compute study: does the modality-aware MoE pay on the synthetic shapes set?

    python benchmarks/study.py run --steps 600 --seeds 0 1 2 --jobs 2            # every variant, same steps
    python benchmarks/study.py run --steps 812 --seeds 0 1 2 --jobs 2 \\
        --variants dense --tag equal-time                                       # dense at the MoE's wall-clock
    python benchmarks/study.py report                                           # tables (JSON + Markdown) and plots

``run`` trains each (variant, seed) with ``train.py`` (validation loss and exact match at the last
step), evaluates the final model on the test split with ``eval.py`` (VQA and captions), and writes
``docs/results/study/TAG/VARIANT-seedS.json``; a run whose JSON exists is not repeated. Runs go to
``runs/study/`` (not kept); the routing pictures of the demo's variant (seed 0) are copied to
``docs/results/TAG_routing_*.png``. ``--jobs 2`` runs two trainings at once with one thread each.

``report`` reads every run JSON and writes ``docs/results/study.json`` (mean, std and each seed),
``docs/results/study.md`` (the tables of docs/RESULTS.md) and the plots ``study_*.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
SHARDS = "data/shapes"

_SHARED, _SEPARATE = ["model.share_moe_layers=true"], ["model.share_moe_layers=false"]
_ROUTING = {
    "one-router": ["model.moe.modality_mode=shared", "model.moe.experts_per_modality=[]"],
    "per-modality": ["model.moe.modality_mode=per_modality", "model.moe.experts_per_modality=[]"],
    "partitioned": ["model.moe.modality_mode=partitioned", "model.moe.experts_per_modality=[2,2]"],
}
# name -> (config, overrides). MoE layers are shared across the towers unless the name ends in -per-tower.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dense": ("configs/tiny-dense.yaml", []),
    "dense-vit-mlp4": ("configs/tiny-dense.yaml", ["model.vision.mlp_ratio=4.0"]),  # 2/3 of the ViT's active MLP
    **{f"moe-{name}": ("configs/tiny.yaml", overrides + _SHARED) for name, overrides in _ROUTING.items()},
    **{f"moe-{name}-per-tower": ("configs/tiny.yaml", overrides + _SEPARATE) for name, overrides in _ROUTING.items()},
}
DEMO_VARIANT = "moe-per-modality"  # configs/tiny.yaml as it is


# ------------------------------------------------------------------------------ run


def _run(command: list[str], log: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with log.open("a") as out:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _load_balance_curve(rows: list[dict]) -> dict[str, list[list[float]]]:
    """Per modality: ``[step, mean load-balance loss over the MoE layers]`` at each stats step."""
    curves: dict[str, list[list[float]]] = {}
    for row in rows:
        for modality in ("image", "text"):
            values = [v for k, v in row.items() if k.startswith("moe/") and k.endswith(f"/{modality}/load_balance")]
            if values:
                curves.setdefault(modality, []).append([row["step"], statistics.fmean(values)])
    return curves


def run_one(variant: str, seed: int, steps: int, tag: str, threads: int, eval_limit: int | None) -> Path:
    result_path = RESULTS / "study" / tag / f"{variant}-seed{seed}.json"
    if result_path.exists():
        return result_path
    config, overrides = VARIANTS[variant]
    name = f"{tag}/{variant}-seed{seed}"
    run_dir = ROOT / "runs" / "study" / name
    log = run_dir.parent / f"{run_dir.name}.log"  # beside the run folder: train.py starts in an empty one
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished earlier attempt
    log.unlink(missing_ok=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    train_s = _run(
        [sys.executable, "train.py", "--config", config, *overrides, f"train.name={name}",
         "train.output_dir=runs/study", f"train.seed={seed}", f"train.steps={steps}", f"train.eval_every={steps}",
         "train.checkpoint_every=0", "train.log_every=25", "train.stats_every=50"],
        log, threads,
    )
    final = run_dir / "final"
    limit = [] if eval_limit is None else ["--limit", str(eval_limit)]
    for task in ("vqa", "caption"):
        _run([sys.executable, "eval.py", "--checkpoint", str(final), "--data", f"{SHARDS}/{task}/test-*.tar",
              "--task", task, "--num-workers", "1", *limit], log, threads)
    rows = _read_metrics(run_dir / "metrics.jsonl")
    val = next(r for r in reversed(rows) if "val/vqa_loss" in r)
    vqa = json.loads((final / "eval_vqa" / "metrics.json").read_text())
    caption = json.loads((final / "eval_caption" / "metrics.json").read_text())
    train_rows = [r for r in rows if "loss" in r]
    result = {
        "variant": variant, "seed": seed, "steps": steps, "tag": tag, "threads": threads,
        "train_wall_s": round(train_s, 1),
        "samples_per_s": statistics.median(r["samples_per_s"] for r in train_rows),
        "val_caption_loss": val["val/caption_loss"], "val_vqa_loss": val["val/vqa_loss"],
        "val_vqa_exact_match": val["val/vqa_exact_match"],
        "test_vqa_exact_match": vqa["exact_match"], "test_vqa_by_type": vqa["vqa_accuracy_by_type"],
        "test_caption_exact_match": caption["exact_match"], "test_cider_d": caption["cider_d"],
        "test_bleu_4": caption["bleu_4"],
        "loss_curve": [[r["step"], r["lm_loss"]] for r in train_rows],
        "load_balance_curve": _load_balance_curve(rows),
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1))
    if variant == DEMO_VARIANT and seed == 0:
        copy_routing_pictures(final, tag)
    return result_path


def copy_routing_pictures(final: Path, tag: str) -> None:
    """The caption evaluation's routing pictures of ``final`` into docs/results/, named by ``tag``."""
    for picture in ("routing_load.png", "routing_patches.png"):
        shutil.copy(final / "eval_caption" / picture, RESULTS / f"{tag}_{picture}")


def run(args: argparse.Namespace) -> None:
    if not (ROOT / SHARDS / "index.json").exists():
        sys.exit(f"no shapes set at {SHARDS}: run `make data` (python data_scripts/make_shapes.py --output {SHARDS})")
    variants = args.variants or list(VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    threads = max(1, args.threads // args.jobs)
    # seed-major order: every variant gets seed 0 before any gets seed 1, so a cut-short study is balanced
    work = [(v, s) for s in args.seeds for v in variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(run_one, v, s, args.steps, args.tag, threads, args.eval_limit) for v, s in work]
        for job in jobs:
            print(job.result(), flush=True)


# ------------------------------------------------------------------------------ report

_METRICS = {
    "test_vqa_exact_match": "test VQA EM",
    "test_caption_exact_match": "test caption EM",
    "test_cider_d": "test CIDEr-D",
    "val_vqa_loss": "val VQA loss",
    "val_caption_loss": "val caption loss",
}


def _summarise(runs: list[dict]) -> dict:
    summary = {"seeds": [r["seed"] for r in runs], "steps": runs[0]["steps"]}
    for key in [*_METRICS, "train_wall_s"]:
        values = [r[key] for r in runs]
        summary[key] = {"mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
    types = runs[0]["test_vqa_by_type"]
    summary["test_vqa_by_type"] = {t: statistics.fmean(r["test_vqa_by_type"][t] for r in runs) for t in types}
    return summary


def _table(summary: dict[str, dict[str, dict]]) -> str:
    lines = ["| run | steps | seeds | " + " | ".join(_METRICS.values()) + " |",
             "|---|---:|---:|" + "---:|" * len(_METRICS)]
    for tag, variants in summary.items():
        for variant, s in variants.items():
            cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in _METRICS]
            lines.append(f"| {tag}: {variant} | {s['steps']} | {len(s['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _by_type_table(summary: dict[str, dict[str, dict]]) -> str:
    types = next(iter(next(iter(summary.values())).values()))["test_vqa_by_type"]
    lines = ["| run | " + " | ".join(types) + " |", "|---|" + "---:|" * len(types)]
    for tag, variants in summary.items():
        for variant, s in variants.items():
            lines.append(f"| {tag}: {variant} | " + " | ".join(f"{s['test_vqa_by_type'][t]:.3f}" for t in types) + " |")
    return "\n".join(lines)


def _seed_table(groups: dict[tuple[str, str], list[dict]]) -> str:
    """One row per run: the figures behind each mean, by question type."""
    types = next(iter(groups.values()))[0]["test_vqa_by_type"]
    lines = ["| run | seed | steps | training s | samples/s | test VQA EM | " + " / ".join(types)
             + " | test caption EM | test CIDEr-D |", "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for (tag, variant), group in groups.items():
        for r in group:
            by_type = " / ".join(f"{r['test_vqa_by_type'][t]:.2f}" for t in types)
            lines.append(f"| {tag}: {variant} | {r['seed']} | {r['steps']} | {r['train_wall_s']:.0f} | "
                         f"{r['samples_per_s']:.1f} | {r['test_vqa_exact_match']:.3f} | {by_type} | "
                         f"{r['test_caption_exact_match']:.3f} | {r['test_cider_d']:.2f} |")
    return "\n".join(lines)


def _plots(summary: dict[str, dict[str, dict]], runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{tag}\n{variant}" for tag, variants in summary.items() for variant in variants]
    cells = [s for variants in summary.values() for s in variants.values()]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
    for ax, key in zip(axes, ("test_vqa_exact_match", "test_caption_exact_match", "test_cider_d", "val_caption_loss")):
        ax.bar(range(len(cells)), [c[key]["mean"] for c in cells], yerr=[c[key]["std"] for c in cells], capsize=3,
               color=["tab:gray" if "dense" in label else "tab:blue" for label in labels])
        for i, c in enumerate(cells):
            ax.scatter([i] * len(c[key]["values"]), c[key]["values"], color="black", s=8, zorder=3)
        ax.set_xticks(range(len(cells)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(_METRICS[key] + " (mean ± std, dots: seeds)")
    fig.tight_layout()
    fig.savefig(RESULTS / "study_quality.png", dpi=110)
    plt.close(fig)

    fig, (loss_ax, balance_ax) = plt.subplots(1, 2, figsize=(14, 5))
    colors = {variant: plt.cm.tab10(i) for i, variant in enumerate(VARIANTS)}
    for (tag, variant), group in _groups(runs).items():
        curve = _mean_curve([r["loss_curve"] for r in group])
        loss_ax.plot(*zip(*curve), label=f"{tag}: {variant}", color=colors[variant],
                     linestyle="-" if tag == "equal-steps" else "--")
        for modality, style in (("image", "-"), ("text", ":")):
            curves = [r["load_balance_curve"][modality] for r in group if modality in r["load_balance_curve"]]
            if curves and tag == "equal-steps":
                balance_ax.plot(*zip(*_mean_curve(curves)), style, color=colors[variant], label=f"{variant} / {modality}")
    loss_ax.set(title="training LM loss (mean over seeds)", xlabel="step", ylabel="loss", ylim=(0.1, 1.0))
    balance_ax.set(title="load-balance loss (uniform routing = top_k = 2)\nmean over layers and seeds; solid: image, dotted: text",
                   xlabel="step", ylabel="Switch load-balance loss")
    loss_ax.legend(fontsize=7)
    balance_ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / "study_training.png", dpi=110)
    plt.close(fig)


def _groups(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    tags = ["equal-steps", "equal-time", "demo-budget"]
    rank = lambda tag: tags.index(tag) if tag in tags else len(tags)  # noqa: E731
    for r in sorted(runs, key=lambda r: (rank(r["tag"]), r["tag"], list(VARIANTS).index(r["variant"]), r["seed"])):
        groups.setdefault((r["tag"], r["variant"]), []).append(r)
    return groups


def _mean_curve(curves: list[list[list[float]]]) -> list[tuple[float, float]]:
    length = min(len(c) for c in curves)
    return [(curves[0][i][0], statistics.fmean(c[i][1] for c in curves)) for i in range(length)]


def report(args: argparse.Namespace) -> None:
    runs = [json.loads(p.read_text()) for p in sorted((RESULTS / "study").glob("*/*.json"))]
    if not runs:
        sys.exit(f"no runs under {RESULTS / 'study'}: run `python benchmarks/study.py run` first")
    summary: dict[str, dict[str, dict]] = {}
    groups = _groups(runs)
    for (tag, variant), group in groups.items():
        summary.setdefault(tag, {})[variant] = _summarise(group)
    (RESULTS / "study.json").write_text(json.dumps(summary, indent=1))
    tables = (f"{_table(summary)}\n\nTest VQA exact match by question type (mean over seeds):\n\n"
              f"{_by_type_table(summary)}\n\nEach run:\n\n{_seed_table(groups)}\n")
    (RESULTS / "study.md").write_text(tables)
    _plots(summary, runs)
    print(json.dumps({tag: {v: {k: round(s[k]["mean"], 4) for k in _METRICS} for v, s in variants.items()}
                      for tag, variants in summary.items()}, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train and evaluate variants x seeds")
    run_parser.add_argument("--steps", type=int, default=600)
    run_parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run_parser.add_argument("--variants", nargs="+", help=f"default: all of {list(VARIANTS)}")
    run_parser.add_argument("--tag", default="equal-steps", help="the results subfolder (e.g. equal-time)")
    run_parser.add_argument("--jobs", type=int, default=1, help="trainings at once")
    run_parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads shared by the jobs")
    run_parser.add_argument("--eval-limit", type=int, help="evaluate the first N test samples only")
    commands.add_parser("report", help="tables and plots from the finished runs")
    args = parser.parse_args(argv)
    (run if args.command == "run" else report)(args)


if __name__ == "__main__":
    main()
