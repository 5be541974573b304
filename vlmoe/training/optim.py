"""AdamW parameter groups and the learning-rate schedule.

Notable choices:
- Every parameter belongs to one of ``PARAM_GROUPS`` by where it sits: routers and experts
  (MoE layers, shared ones included) first, then the tower or projector that holds it. Each
  group has its own learning-rate multiplier and can be frozen: ``freeze=[vision, decoder,
  projector]`` trains the MoE layers only (MoE-LLaVA's third stage).
- No weight decay on norms, biases (anything 1-D), routers, and the ViT's position embeddings
  and prefix tokens (timm's ``no_weight_decay()``).
- Under LoRA (a PEFT-wrapped model) names lose PEFT's prefix and the frozen base is left out.
- torch's fused AdamW kernel unless ``optim.fused=false``: the default on CPU is a dozen ops per
  parameter, launched from Python.
- Warmup then cosine decay to ``lr * min_lr_ratio`` (transformers' schedule).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from .config import PARAM_GROUPS, OptimConfig


PEFT_PREFIX = "base_model.model."  # names inside a PeftModel (LoRA)


def param_group_of(name: str) -> str:
    name = name.removeprefix(PEFT_PREFIX)
    if ".router." in f".{name}":
        return "routers"
    if ".experts." in f".{name}" or ".shared_experts." in f".{name}":
        return "experts"
    heads = (("vision.", "vision"), ("projector.", "projector"), ("pixel_head.", "projector"), ("language_model.", "decoder"))
    for prefix, group in heads:
        if name.startswith(prefix):
            return group
    raise ValueError(f"parameter {name!r} belongs to no group of {list(PARAM_GROUPS)}")


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    no_decay = getattr(model.vision.vit, "no_weight_decay", lambda: set())()
    no_decay_names = {f"{prefix}vision.vit.{n}" for n in no_decay for prefix in ("", PEFT_PREFIX)}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        group = param_group_of(name)
        if group in config.freeze:
            param.requires_grad_(False)
            continue
        if not param.requires_grad:  # frozen by LoRA: only the adapters train
            continue
        decay = param.ndim >= 2 and group != "routers" and name not in no_decay_names
        buckets.setdefault((group, decay), []).append(param)
    groups = [
        {
            "params": params, "name": f"{group}{'' if decay else '_no_decay'}",
            "lr": config.lr * config.lr_mult.get(group, 1.0), "weight_decay": config.weight_decay if decay else 0.0,
        }
        for (group, decay), params in sorted(buckets.items())
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=config.fused)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, steps: int):
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=min(config.warmup_steps, steps), num_training_steps=steps,
        min_lr_rate=config.min_lr_ratio,
    )
