"""Evaluate a trained model on caption or VQA shards.

    python eval.py --checkpoint runs/tiny/final --data "data/shapes/vqa/test-*.tar" --task vqa
    python eval.py --checkpoint runs/tiny/final --data "data/shapes/caption/test-*.tar" --task caption --num-beams 3
    torchrun --nproc_per_node 2 eval.py --checkpoint DIR --data SHARDS --task vqa   # several processes

Writes to ``--output`` (default ``CHECKPOINT/eval_TASK``): ``metrics.json``, ``predictions.json``
(official COCO caption / VQA results format), ``samples.jsonl``, ``routing.json``,
``routing_load.png`` and ``routing_patches.png``; prints the metrics as JSON. ``metrics.json``
counts the samples the data pipeline skipped (``num_skipped``, by reason). The exit status is
non-zero when no sample was evaluated, and when any was skipped unless ``--allow-skips`` is given
(the files are written either way).
"""

from __future__ import annotations

import argparse
import json
import os

from vlmoe import VLMoEForConditionalGeneration, VLMoEProcessor
from vlmoe.evaluation.runner import EvalOptions, eval_failure, evaluate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a save_pretrained folder (e.g. runs/NAME/final)")
    parser.add_argument("--data", required=True, help="shards: a brace pattern, a glob or a folder")
    parser.add_argument("--task", required=True, choices=["caption", "vqa"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--output", default=None, help="output folder (default CHECKPOINT/eval_TASK)")
    parser.add_argument("--scorer", choices=["python", "official"], default="python",
                        help="caption metrics: python (no Java, equal to pycocoevalcap) or official "
                             "(pycocoevalcap with Java; adds METEOR): pip install 'vlmoe[coco]'")
    parser.add_argument("--allow-skips", action="store_true",
                        help="exit 0 even if the data pipeline skipped samples (corrupt images, missing text)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint!r} is not a folder")
    model = VLMoEForConditionalGeneration.from_pretrained(args.checkpoint)
    processor = VLMoEProcessor.from_pretrained(args.checkpoint)
    options = EvalOptions(args.batch_size, args.num_beams, args.max_new_tokens, args.limit, args.num_workers,
                          scorer=args.scorer)
    output = args.output or os.path.join(args.checkpoint, f"eval_{args.task}")
    metrics = evaluate(model, processor, args.data, args.task, output, options)
    if metrics:
        print(json.dumps(metrics))
    failure = eval_failure(metrics, args.allow_skips)
    if failure is not None:
        raise SystemExit(f"eval.py --data {args.data!r}: {failure}; files written to {output}")
    return metrics


if __name__ == "__main__":
    main()
