"""Evaluation metrics of vlmoe: COCO caption metrics and the official VQA accuracy as torchmetrics Metrics."""

from vlmoe.evaluation.caption_metrics import (
    CaptionExactMatch,
    CaptionMetrics,
    CIDErD,
    CocoBLEU,
    CocoROUGEL,
    caption_exact_match,
    coco_tokenize,
    compute_caption_metrics,
    normalize_caption,
    ptb_tokenize,
)
from vlmoe.evaluation.metrics import GatheredStateMetric, to_json_dict
from vlmoe.evaluation.vqa_metrics import (
    VQAAccuracy,
    VQAExactMatch,
    VQAMetrics,
    compute_vqa_metrics,
    normalize_vqa_answer,
    vqa_accuracy,
)

__all__ = [
    "CIDErD",
    "CaptionExactMatch",
    "CaptionMetrics",
    "CocoBLEU",
    "CocoROUGEL",
    "GatheredStateMetric",
    "VQAAccuracy",
    "VQAExactMatch",
    "VQAMetrics",
    "caption_exact_match",
    "coco_tokenize",
    "compute_caption_metrics",
    "compute_vqa_metrics",
    "normalize_caption",
    "normalize_vqa_answer",
    "ptb_tokenize",
    "to_json_dict",
    "vqa_accuracy",
]
