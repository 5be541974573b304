"""Evaluate a model on caption or VQA shards: predictions, metrics, routing pictures.

Notable choices:
- The shards are split across processes by the data pipeline (each sample exactly once);
  predictions are gathered with ``gather_object`` and scored once, on the main process.
- Each batch is generated with the KV cache (transformers' ``generate``); one extra
  teacher-forced forward over [image ; prompt ; generated text] records the routing of every
  position for the routing summary and pictures.
- Samples the data pipeline skips (corrupt images, missing text, damaged shards; ``data.SKIP_REASONS``)
  are counted by the pipeline itself (``SampleLoader.stats``), summed over processes and written to
  ``metrics.json`` as ``num_skipped`` by reason, next to ``num_images`` / ``num_questions``;
  ``eval_failure`` says when a run should not pass as a clean result.
- Metrics come from ``vlmoe.evaluation.score``, the code that scores any results file: a sample id evaluated
  twice is an error naming it; ``EvalOptions.scorer = "official"`` runs pycocoevalcap (Java) for captions.
- The progress bar counts samples, with a total where it is known before reading (``--limit``, or
  the sample counts the shards' writers recorded, in one process).
- Files: ``metrics.json``, ``predictions.json`` in the official results format (COCO captions
  ``[{"image_id", "caption"}]``, VQA ``[{"question_id", "answer"}]``), ``samples.jsonl`` for
  error analysis, ``routing.json``, ``routing_load.png`` and ``routing_patches.png``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from itertools import islice

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..data import SKIP_REASONS, DataSource, SampleLoader, build_loader, expand_shards
from ..data.reader import recorded_sample_count
from ..tasks import GenerationCollate
from ..data.references import VQAReference
from .caption_metrics import caption_exact_match
from .routing import RoutingSummary, denormalize, patch_experts, plot_load_heatmap, plot_patch_experts
from .score import score_captions, score_vqa, unique_predictions
from .vqa_metrics import vqa_accuracy


@dataclass
class EvalOptions:
    batch_size: int = 32
    num_beams: int = 1
    max_new_tokens: int = 24
    limit: int | None = None
    num_workers: int = 1
    num_pictures: int = 4
    scorer: str = "python"  # caption metrics: "python" (no Java) or "official" (pycocoevalcap, adds METEOR)


def _prediction_record(task: str, record: dict) -> dict:
    """One entry of the official results format, from a per-sample record."""
    if task == "caption":
        return {"image_id": record["image_id"], "caption": record["prediction"]}
    return {"question_id": record["question_id"], "answer": record["prediction"]}


def _sample_record(task: str, sample, text: str) -> dict:
    record = {"key": sample.key, "image_id": sample.image_id, "prediction": text}
    if task == "caption":
        return {**record, "references": sample.captions, "exact_match": caption_exact_match(text, sample.captions)}
    return {
        **record, "question_id": sample.question_id, "question": sample.question, "question_type": sample.question_type,
        "answer_type": sample.meta.get("answer_type"), "answers": sample.answers,
        "vqa_accuracy": vqa_accuracy(text, sample.answers),
    }


def compute_metrics(task: str, records: list[dict], scorer: str = "python") -> dict:
    """Score per-sample records with ``vlmoe.evaluation.score`` (the code of ``python -m vlmoe.evaluation.score``);
    an id evaluated twice is an error naming it."""
    id_field = "image_id" if task == "caption" else "question_id"
    predictions = unique_predictions([(r[id_field], r["prediction"]) for r in records], id_field)
    if task == "caption":
        return score_captions(predictions, {r["image_id"]: r["references"] for r in records}, scorer)
    references = {
        r["question_id"]: VQAReference(r["question_id"], r["image_id"], r["question"], r["answers"],
                                       r["question_type"], r["answer_type"])
        for r in records
    }
    return score_vqa(predictions, references)


@torch.no_grad()
def evaluate(
    model, processor, shards: str, task: str, output_dir: str, options: EvalOptions | None = None,
    accelerator: Accelerator | None = None,
) -> dict:
    """Generate for every sample of ``shards``, score, and write the evaluation files to ``output_dir``."""
    options = options or EvalOptions()
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    model = model.to(acc.device).eval()
    records, summary, pictures = [], RoutingSummary(), None
    loader = _loader(processor, shards, task, options, acc)
    start = time.perf_counter()
    bar = tqdm(total=_expected_samples(shards, options, acc), desc=f"eval {task}", unit="sample",
               disable=not acc.is_main_process)
    for batch, samples in _batches(loader, options, acc):
        bar.update(len(samples))
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        generated = model.generate(**batch, max_new_tokens=options.max_new_tokens, num_beams=options.num_beams, do_sample=False)
        texts = processor.decode(generated, batch["input_ids"].shape[1])
        records += [_sample_record(task, s, t) for s, t in zip(samples, texts)]
        routing = _routing_forward(model, batch, generated)
        summary.add(routing)
        if pictures is None and acc.is_main_process:
            pictures = _patch_pictures(model, processor, batch, routing, options.num_pictures)
    bar.close()
    elapsed = time.perf_counter() - start
    records = gather_object(records)
    summaries = gather_object([summary])
    skipped = gather_object([loader.stats.skipped])
    if not acc.is_main_process:
        return {}
    for other in summaries[1:]:
        summaries[0].merge(other)
    metrics = compute_metrics(task, records, options.scorer)
    # With a limit every process reads the same samples (``_batches``): count one process's skips.
    metrics["num_skipped"] = _skip_counts(skipped[:1] if options.limit is not None else skipped)
    metrics["images_per_s"] = round(len(records) / max(elapsed, 1e-9), 3)
    _write(output_dir, task, metrics, records, summaries[0], pictures, model.config.moe.num_experts)
    return metrics


def eval_failure(metrics: dict, allow_skips: bool = False) -> str | None:
    """Why an evaluation must not pass as a result: nothing was evaluated, or samples were skipped
    (unless ``allow_skips``); None when it may. ``metrics`` is what ``evaluate`` returned."""
    if not metrics:  # not the main process: the main process decides
        return None
    evaluated = metrics.get("num_images", metrics.get("num_questions"))
    skipped = {reason: n for reason, n in metrics["num_skipped"].items() if n}
    if evaluated == 0:
        return f"no sample was evaluated (skipped by reason: {skipped or 'none'})"
    if skipped and not allow_skips:
        return (f"{sum(skipped.values())} sample(s) skipped ({skipped}; the warnings above name each one) "
                "and not evaluated; pass --allow-skips to accept the metrics of the rest")
    return None


def _skip_counts(per_process: list[Counter]) -> dict[str, int]:
    """Skipped samples by reason (every reason, zeros included), summed over processes."""
    total = sum(per_process, Counter())
    return {reason: total[reason] for reason in SKIP_REASONS}


def _loader(processor, shards: str, task: str, options: EvalOptions, acc: Accelerator) -> SampleLoader:
    limited = options.limit is not None
    return build_loader(
        DataSource(shards, task), train=False, batch_size=options.batch_size, collate=GenerationCollate(processor),
        rank=0 if limited else acc.process_index, world_size=1 if limited else acc.num_processes,
        num_workers=options.num_workers,
    )


def _expected_samples(shards: str, options: EvalOptions, acc: Accelerator) -> int | None:
    """How many samples this process evaluates, where that is known before reading: with a limit
    (its batches of the first ``limit``), or in one process from the counts the shards' writers
    recorded (``recorded_sample_count``); None otherwise (the bar then counts without a total)."""
    if options.limit is not None:
        sizes = [min(options.batch_size, options.limit - start) for start in range(0, options.limit, options.batch_size)]
        return sum(sizes[acc.process_index :: acc.num_processes])
    if acc.num_processes > 1:  # shards are split by rank: a process's share is not known in advance
        return None
    counts = [recorded_sample_count(url) for url in expand_shards(shards)]
    return None if None in counts else sum(counts)


def _batches(loader: SampleLoader, options: EvalOptions, acc: Accelerator):
    """This process's generation batches: its share of all samples, or of the first ``limit``.

    With a limit, every process reads the same first ``limit`` samples and keeps every P-th batch,
    so the samples evaluated do not depend on the number of processes.
    """
    if options.limit is None:
        yield from loader
        return
    batches = islice(loader, math.ceil(options.limit / options.batch_size))
    for i, (batch, samples) in enumerate(batches):
        keep = min(len(samples), options.limit - i * options.batch_size)
        if i % acc.num_processes == acc.process_index:
            yield {k: v[:keep] for k, v in batch.items()}, samples[:keep]


def _routing_forward(model, batch: dict, generated: torch.Tensor):
    """Routing of every position of the generated sequences (teacher-forced, no cache)."""
    mask = torch.cat([batch["attention_mask"], torch.ones_like(generated[:, batch["input_ids"].shape[1]:])], dim=1)
    return model(input_ids=generated, attention_mask=mask, pixel_values=batch["pixel_values"], use_cache=False).routing


def _patch_pictures(model, processor, batch: dict, routing, num_images: int):
    vision = model.config.vision
    maps = patch_experts(routing, num_images, model.vision.num_prefix_tokens, model.vision.grid_size)
    if not maps:
        return None
    images = denormalize(batch["pixel_values"][:num_images], vision.image_mean, vision.image_std)
    return images, maps


def _write(output_dir: str, task: str, metrics: dict, records: list[dict], summary: RoutingSummary, pictures, num_experts: int) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    with open(os.path.join(output_dir, "predictions.json"), "w") as f:
        json.dump([_prediction_record(task, r) for r in records], f)
    with open(os.path.join(output_dir, "samples.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    summary.save_json(os.path.join(output_dir, "routing.json"))
    if summary.counts:
        plot_load_heatmap(summary, os.path.join(output_dir, "routing_load.png"))
    if pictures is not None:
        plot_patch_experts(*pictures, num_experts, os.path.join(output_dir, "routing_patches.png"))
