"""Data: webdataset shards of caption and VQA samples, read into batches for training and eval.

- ``Sample``: one image (PIL RGB) with its captions or its question and answers.
- ``build_dataset`` / ``build_loader``: the webdataset pipeline over ``DataSource``s; training
  streams resume from a saved position (``resumable``).
- ``shards``: shard patterns and a deterministic shard writer (used by ``data_scripts/``).
- ``references``: caption and VQA reference files for evaluation.

Imports no model code.
"""

from .pipeline import Batch, DataSource, LoaderStats, SampleLoader, build_dataset, build_loader
from .reader import Skipped, read_shard
from .references import (
    VQAReference,
    caption_references,
    load_caption_references,
    load_vqa_references,
    vqa_references,
)
from .sample import (
    IMAGE_EXTENSIONS,
    SKIP_REASONS,
    TASKS,
    BadSample,
    Sample,
    decode_image,
    open_image,
    parse_sample,
    to_rgb,
)
from .shards import ShardWriter, expand_shards
from .split import Split, split_for

__all__ = [
    "Batch", "BadSample", "DataSource", "IMAGE_EXTENSIONS", "LoaderStats", "SKIP_REASONS", "Sample", "SampleLoader",
    "ShardWriter", "Skipped", "Split", "TASKS", "VQAReference", "build_dataset", "build_loader", "caption_references",
    "decode_image", "expand_shards", "load_caption_references", "load_vqa_references", "open_image", "parse_sample",
    "read_shard", "split_for", "to_rgb", "vqa_references",
]
