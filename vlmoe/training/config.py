"""The training configuration: nested dataclasses loaded from YAML through OmegaConf.

Notable choices:
- One schema (the dataclasses below, reusing the model's own parts), merged in order: defaults,
  the YAML file, then ``dotted.key=value`` overrides. OmegaConf rejects an unknown key or a
  value of the wrong type and names the full key; each dataclass's ``__post_init__`` then
  checks values and combinations and raises ``ValueError`` naming the field. All of it happens
  before anything is built.
- The resolved config is written to the run folder as YAML and rebuilds the same run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..data import DataSource
from ..lora import LoRAConfig
from ..model.config import (
    CAPTION_PROMPT, VQA_PROMPT, DecoderConfig, ProjectorConfig, VisionConfig, VLMoEConfig,
)
from ..model.upcycle import check_parent_config, load_parent_config
from ..tasks import CAPTION_TARGETS
from ..moe import MoEConfig

PARAM_GROUPS = ("vision", "decoder", "projector", "experts", "routers")
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from when the decoder is built from scratch.

    Attributes:
        path: a saved tokenizer folder; ``None`` trains a byte-level BPE on the training texts.
        vocab_size: the trained tokenizer's vocabulary size.
        train_samples: how many training samples the tokenizer learns from, drawn evenly from every
            training source.
    """

    path: str | None = None
    vocab_size: int = 512
    train_samples: int = 5000


@dataclass
class ModelConfig:
    """The model's parts (``VLMoEConfig``'s), its tokenizer, and where its weights start.

    Attributes:
        init_from: a vlmoe ``save_pretrained`` folder (e.g. ``runs/NAME/final``) to start from:
            each MLP that this config makes a MoE layer is upcycled from the checkpoint's dense MLP
            at the same place, everything else is loaded as it is, and the run uses its tokenizer.
        upcycle_noise: Gaussian noise added to each upcycled expert, relative to each dense
            weight's std (0: the upcycled model computes what its parent did).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    share_moe_layers: bool = False
    caption_prompt: str = CAPTION_PROMPT
    vqa_prompt: str = VQA_PROMPT
    max_text_length: int = 64
    pixel_loss_weight: float = 0.0
    pixel_loss_size: int | None = None
    image_position_ids: str = "sequential"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    init_from: str | None = None
    upcycle_noise: float = 0.0

    def __post_init__(self) -> None:
        # The model's config validates itself; made here too, as the trainer makes it only after
        # the run folder and the tokenizer are written.
        config = self.to_vlmoe_config()
        if self.upcycle_noise < 0:
            raise ValueError(f"model.upcycle_noise must be >= 0, got {self.upcycle_noise}")
        if self.init_from is not None:
            self._check_init_from(config)

    def _check_init_from(self, config: VLMoEConfig) -> None:
        """The checkpoint is a vlmoe folder whose towers are this config's; nothing else gives weights."""
        given = {"model.vision.pretrained_file": self.vision.pretrained_file,
                 "model.decoder.pretrained_path": self.decoder.pretrained_path,
                 "model.tokenizer.path": self.tokenizer.path}
        for key, value in given.items():
            if value is not None:
                raise ValueError(f"model.init_from and {key} are both set: the checkpoint gives the weights and "
                                 f"the tokenizer; unset {key}")
        try:
            check_parent_config(config, load_parent_config(self.init_from))
        except ValueError as err:
            prefix = "model." if str(err).startswith(("vision.", "decoder.", "projector")) else ""
            raise ValueError(f"model.init_from={self.init_from!r}: {prefix}{err}") from None

    def to_vlmoe_config(self) -> VLMoEConfig:
        return VLMoEConfig(
            vision=self.vision, decoder=self.decoder, projector=self.projector, moe=self.moe,
            share_moe_layers=self.share_moe_layers, caption_prompt=self.caption_prompt,
            vqa_prompt=self.vqa_prompt, max_text_length=self.max_text_length,
            pixel_loss_weight=self.pixel_loss_weight,
            pixel_loss_size=self.pixel_loss_size, image_position_ids=self.image_position_ids,
        )


@dataclass
class SourceConfig:
    pattern: str = "???"
    task: str = "caption"
    weight: float = 1.0
    conversations: bool = False  # vqa: the questions about one image train as one sequence (``DataSource``)

    def to_source(self) -> DataSource:
        return DataSource(self.pattern, self.task, self.weight, self.conversations)


@dataclass
class DataConfig:
    """Attributes:
    train / val: shard sources (pattern, task, weight); training mixes ``train`` by weight.
    batch_size: samples per process per step (before gradient accumulation); with
        ``split_batches``, samples per step over all processes, each loading its share (as
        Accelerate's ``split_batches``), so that a config trains the same on any number of processes.
    caption_target: what a caption sample trains on: ``canonical``, its first reference;
        ``random``, one of its references, drawn anew each epoch (``vlmoe.tasks.training_target``).
    """

    train: list[SourceConfig] = field(default_factory=list)
    val: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 32
    split_batches: bool = False
    eval_batch_size: int = 64
    num_workers: int = 2
    shuffle_buffer: int = 1000
    caption_target: str = "canonical"

    def __post_init__(self) -> None:
        if self.caption_target not in CAPTION_TARGETS:
            raise ValueError(f"data.caption_target={self.caption_target!r} is not one of {list(CAPTION_TARGETS)}")
        for name in ("batch_size", "eval_batch_size", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0: load in the main process), got {self.num_workers}")
        for split in ("train", "val"):  # a validation source's typo would otherwise surface at the first validation
            for i, source in enumerate(getattr(self, split)):
                try:
                    source.to_source()
                except ValueError as err:
                    raise ValueError(f"data.{split}[{i}]: {err}") from None

    def batch_size_per_process(self, num_processes: int) -> int:
        if not self.split_batches:
            return self.batch_size
        if self.batch_size % num_processes:
            raise ValueError(f"data.batch_size={self.batch_size} with data.split_batches=true does not split evenly "
                             f"over {num_processes} processes")
        return self.batch_size // num_processes


@dataclass
class OptimConfig:
    """AdamW with parameter groups and warmup + cosine decay.

    Attributes:
        lr_mult: learning-rate multiplier per group (``vision``, ``decoder``, ``projector``,
            ``experts``, ``routers``); experts and routers win over the tower they sit in.
        freeze: groups whose parameters are not trained.
        min_lr_ratio: the cosine schedule ends at ``lr * min_lr_ratio``.
        fused: torch's fused AdamW kernel (CPU, CUDA and the other devices torch lists): one pass
            per parameter instead of a dozen ops; on a 2-core CPU the tiny models' optimizer step
            takes a quarter of the time. False for the op-by-op implementation.
    """

    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    lr_mult: dict[str, float] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)
    fused: bool = True

    def __post_init__(self) -> None:
        for name in list(self.lr_mult) + list(self.freeze):
            if name not in PARAM_GROUPS:
                raise ValueError(f"optim.lr_mult/freeze: unknown group {name!r}; groups are {list(PARAM_GROUPS)}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas needs two values, got {self.betas}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for group, mult in self.lr_mult.items():
            if mult < 0:
                raise ValueError(f"optim.lr_mult.{group} must be >= 0, got {mult}")


# train.loss_average -> p: each target token of a sample with n of them weighs n ** -p.
LOSS_AVERAGES = {"token": 0.0, "square": 0.5, "sample": 1.0}


@dataclass
class TrainConfig:
    """Attributes:
    steps: optimizer steps.
    eval_every / eval_samples: validation loss and generation-based exact match, how often and on
        how many validation samples per task.
    checkpoint_every / keep_checkpoints: Accelerate state every N steps, the last K kept.
    max_nonfinite: consecutive non-finite losses tolerated (each skips its step) before stopping.
    overwrite: start afresh in a run folder that is not empty, deleting what it holds (without
        it, a fresh run refuses such a folder; ``--resume`` continues the run in it).
    lora: train LoRA adapters (``lora.rank > 0``; ``vlmoe/lora.py``) instead of every weight.
    loss_average: how the LM loss averages over a step's targets (``LOSS_AVERAGES``): ``token``,
        every target token weighs the same (a 15-token caption counts 15 times a one-word
        answer); ``sample``, every sample weighs the same; ``square``, a sample of n target
        tokens weighs sqrt(n) (InternVL 2.5's square averaging, between the two).
    torch_compile / torch_compile_backend: the training forward and backward through
        ``torch.compile`` with this backend (transformers' ``TrainingArguments`` names). The
        experts run eagerly inside it (their group sizes are data); validation, generation and
        checkpoints use the model itself, so a run resumes with or without it.
    """

    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    steps: int = 1000
    grad_accum: int = 1
    clip_grad_norm: float = 1.0
    mixed_precision: str = "no"
    log_every: int = 10
    stats_every: int = 50
    eval_every: int = 0
    eval_samples: int = 256
    eval_max_new_tokens: int = 8
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    max_nonfinite: int = 5
    overwrite: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    loss_average: str = "token"
    torch_compile: bool = False
    torch_compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.torch_compile:
            if self.torch_compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
                raise ValueError(
                    f"train.torch_compile_backend={self.torch_compile_backend!r} is not a torch.compile backend "
                    f"(these are {torch._dynamo.list_backends()}, and for debugging eager and aot_eager)"
                )
        if self.loss_average not in LOSS_AVERAGES:
            raise ValueError(f"train.loss_average={self.loss_average!r} is not one of {list(LOSS_AVERAGES)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"train.mixed_precision={self.mixed_precision!r} is not one of {list(MIXED_PRECISION)}")
        for name in ("steps", "grad_accum", "log_every", "stats_every", "keep_checkpoints", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):  # 0 = never
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0 (0: never), got {getattr(self, name)}")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.name)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, validated; errors name the key."""
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path is not None:
            if not os.path.isfile(path):
                raise ValueError(f"--config {path!r}: no such file")
            layers.append(OmegaConf.load(path))
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        config = OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ValueError(f"config key {key!r}: {str(err).splitlines()[0]}") from None
    if not config.data.train:  # checked here: the schema's own defaults have no data
        raise ValueError("data.train is empty: give at least one source (pattern, task, weight)")
    return config


def config_to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def as_dict(config: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config))
