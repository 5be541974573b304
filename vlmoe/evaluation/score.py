"""Score a results file in the official formats; eval.py scores its predictions with the same functions.

    python -m vlmoe.evaluation.score caption --predictions results.json --annotations captions.json
    python -m vlmoe.evaluation.score caption --predictions results.json --annotations captions.json --scorer official
    python -m vlmoe.evaluation.score vqa --predictions results.json --questions Q.json --annotations A.json

Prints the metrics as JSON (the ``metrics.json`` keys). Formats:
- caption predictions: COCO results ``[{"image_id", "caption"}]``; annotations: COCO captions
  (``{"images", "annotations": [{"image_id", "caption"}]}``) or ``{image_id: [captions]}`` (JSON object keys are
  strings: all-digit keys are read as int ids).
- VQA predictions: ``[{"question_id", "answer"}]``; questions and annotations: the VQAv2 files.

Notable choices:
- Strict like the official loaders (pycocotools ``loadRes`` asserts that results are annotated ids): a prediction
  id given twice, a prediction for an id the annotations lack, and an annotated id without a prediction are
  errors that name the ids. Ids are compared with their type (``123`` is not ``"123"``).
- Captions are scored in the order of the annotation file, as ``COCOEvalCap`` does.
- ``--scorer python`` (default): vlmoe's pure-Python caption metrics (no Java; equal to pycocoevalcap, see
  ``caption_metrics``). ``--scorer official``: pycocoevalcap itself (``pip install 'vlmoe[coco]'`` and Java):
  its PTB tokenizer, BLEU, METEOR, ROUGE-L, CIDEr-D, and SPICE when its jar and models are present (pycocoevalcap
  would otherwise download them). Both report the same keys; official adds ``meteor`` (and ``spice``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.references import VQAReference, load_caption_references, load_vqa_references
from .caption_metrics import caption_exact_match, compute_caption_metrics
from .metrics import fsum_mean
from .vqa_metrics import compute_vqa_metrics

SCORERS = ("python", "official")


def _show(ids: Iterable[Hashable], limit: int = 10) -> str:
    ids = list(ids)
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(repr(i) for i in ids[:limit]) + more


def unique_predictions(entries: Sequence[tuple[Hashable, str]], id_field: str) -> dict[Hashable, str]:
    """``id -> text`` from ``(id, text)`` pairs; an id given twice is an error naming the ids."""
    counts = Counter(i for i, _ in entries)
    duplicates = [i for i, n in counts.items() if n > 1]
    if duplicates:
        raise ValueError(f"duplicate {id_field} in predictions: {_show(duplicates)}")
    return dict(entries)


def check_ids(predicted: Iterable[Hashable], annotated: Iterable[Hashable], id_field: str) -> None:
    """Predictions must cover exactly the annotated ids: each missing or unknown id is named."""
    predicted, annotated = set(predicted), list(annotated)
    annotated_set = set(annotated)
    unknown = [i for i in predicted if i not in annotated_set]
    missing = [i for i in annotated if i not in predicted]
    if unknown:
        raise ValueError(f"predictions for {id_field} not in the annotations: {_show(unknown)}")
    if missing:
        raise ValueError(f"no prediction for annotated {id_field}: {_show(missing)}")


def read_results(path: str | os.PathLike[str], id_field: str, text_field: str) -> dict[Hashable, str]:
    """A results file ``[{id_field, text_field}]`` as ``id -> text`` (strict, see ``unique_predictions``)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list) or not all(isinstance(r, dict) and {id_field, text_field} <= r.keys() for r in data):
        raise ValueError(f"{os.fspath(path)!r} is not a results list [{{{id_field!r}, {text_field!r}}}, ...]")
    return unique_predictions([(r[id_field], r[text_field]) for r in data], id_field)


def score_captions(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], scorer: str = "python"
) -> dict[str, Any]:
    """Caption metrics of ``image_id -> caption`` against ``image_id -> captions`` (in ``references`` order)."""
    check_ids(predictions, references, "image_id")
    ids = list(references)
    preds, refs = [predictions[i] for i in ids], [list(references[i]) for i in ids]
    if scorer == "python":
        return compute_caption_metrics(preds, refs)
    if scorer == "official":
        return official_caption_metrics(preds, refs)
    raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")


def official_caption_metrics(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, Any]:
    """pycocoevalcap's own tokenizer and scorers (Java): the ``metrics.json`` caption keys plus ``meteor``
    (and ``spice`` when its jar and models are present)."""
    if shutil.which("java") is None:
        raise RuntimeError("--scorer official runs pycocoevalcap's Java tools: install Java "
                           "(e.g. apt-get install default-jre-headless)")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as error:
        raise RuntimeError("--scorer official needs the coco extra: pip install 'vlmoe[coco]'") from error
    gts = PTBTokenizer().tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = PTBTokenizer().tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics: dict[str, Any] = {f"bleu_{k + 1}": float(bleu) for k, bleu in enumerate(bleus)}
    spice = _spice()
    scorers = [("meteor", Meteor()), ("rouge_l", Rouge()), ("cider_d", Cider()), *([("spice", spice)] if spice else [])]
    for name, scorer in scorers:
        metrics[name] = float(scorer.compute_score(gts, res)[0])
    metrics["exact_match"] = fsum_mean(float(caption_exact_match(p, rs)) for p, rs in zip(preds, refs))
    metrics["num_images"] = len(preds)
    return metrics


def _spice():
    """pycocoevalcap's SPICE scorer when its jar and Stanford models are installed; None otherwise."""
    from pycocoevalcap import spice

    folder = Path(spice.__file__).parent
    if not (folder / "spice-1.0.jar").exists() or not list((folder / "lib").glob("stanford-corenlp-*-models.jar")):
        return None
    from pycocoevalcap.spice.spice import Spice

    return Spice()


def score_vqa(predictions: Mapping[Hashable, str], references: Mapping[Hashable, VQAReference]) -> dict[str, Any]:
    """VQA metrics of ``question_id -> answer`` against ``question_id -> VQAReference``."""
    check_ids(predictions, references, "question_id")
    ids = list(references)
    return compute_vqa_metrics(
        [predictions[i] for i in ids], [references[i].answers for i in ids],
        question_types=[references[i].question_type for i in ids],
        answer_types=[references[i].answer_type for i in ids],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    caption = tasks.add_parser("caption", help="COCO caption results")
    caption.add_argument("--predictions", required=True, help='[{"image_id", "caption"}] JSON')
    caption.add_argument("--annotations", required=True, help="COCO captions JSON or {image_id: [captions]}")
    caption.add_argument("--scorer", choices=SCORERS, default="python",
                         help="python: no Java (default); official: pycocoevalcap with Java, adds METEOR")
    vqa = tasks.add_parser("vqa", help="VQA results")
    vqa.add_argument("--predictions", required=True, help='[{"question_id", "answer"}] JSON')
    vqa.add_argument("--questions", required=True, help="VQAv2 questions JSON")
    vqa.add_argument("--annotations", required=True, help="VQAv2 annotations JSON")
    args = parser.parse_args(argv)
    try:
        if args.task == "caption":
            predictions = read_results(args.predictions, "image_id", "caption")
            metrics = score_captions(predictions, load_caption_references(args.annotations), args.scorer)
        else:
            predictions = read_results(args.predictions, "question_id", "answer")
            metrics = score_vqa(predictions, load_vqa_references(args.questions, args.annotations))
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"vlmoe.evaluation.score {args.task}: {error}") from None
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
