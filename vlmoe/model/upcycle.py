"""Start a model from a vlmoe checkpoint (its parent): dense MLPs upcycled, everything else loaded.

Notable choices:
- One upcycling mechanism: the parent's dense MLPs are the sources ``place_moe_layers`` copies
  into every expert of the MoE layers the new config puts at the same places, as it does with a
  pretrained tower's own MLPs (``MoELayer.from_dense``: new routers, zeroed shared experts).
- Everything else comes from the parent as it is, a MoE layer included where both models have
  one of the same shape. What cannot be matched one to one (missing in the checkpoint,
  unexpected, another shape) is an error naming the parameters, never a silent partial load.
- The architecture is compared from the two configs before anything is built
  (``check_parent_config``), so a wrong checkpoint fails with the config key that differs.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..moe import MoELayer, SharedMoE
from .config import VLMoEConfig
from .modeling import VLMoEForConditionalGeneration
from .towers import decoder_layers

VISION_FIELDS = ("model_name", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "conv_stem")
DECODER_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim")
TOKEN_FIELDS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")  # the parent's tokenizer sets them


def load_parent_config(path: str) -> VLMoEConfig:
    """The config of a vlmoe ``save_pretrained`` folder; a clear error when it is not one."""
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a folder (a vlmoe run's final/ folder is expected)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        hint = " (a LoRA run's final/ holds its adapter; its merged/ folder, the whole model)" if os.path.isfile(
            os.path.join(path, "adapter_config.json")) else ""
        raise ValueError(f"{path!r} holds no config.json: not a vlmoe save_pretrained folder{hint}")
    config = VLMoEConfig.from_pretrained(path)
    if config.model_type != VLMoEConfig.model_type:
        raise ValueError(f"{path!r} holds a {config.model_type!r} model, not a vlmoe one")
    return config


def check_parent_config(config: VLMoEConfig, parent: VLMoEConfig) -> None:
    """The new model's towers and projector are the parent's (where the new config says what they are)."""
    for name in VISION_FIELDS:
        mine, theirs = getattr(config.vision, name), getattr(parent.vision, name)
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(f"vision.{name}={mine!r} differs from the checkpoint's {theirs!r}")
    mine, theirs = config.decoder.transformers_config(), parent.get_text_config()
    explicit = [k for k in config.decoder.text_config if k not in TOKEN_FIELDS]
    for name in dict.fromkeys((*DECODER_FIELDS, *explicit)):
        if getattr(mine, name, None) != getattr(theirs, name, None):
            raise ValueError(
                f"decoder.text_config.{name}={getattr(mine, name, None)!r} differs from the checkpoint's "
                f"{getattr(theirs, name, None)!r}"
            )
    if config.projector != parent.projector:
        raise ValueError(f"projector={config.projector} differs from the checkpoint's {parent.projector}")


def _mlps(model: VLMoEForConditionalGeneration) -> dict[tuple[str, int], nn.Module]:
    """Each block's MLP (dense, MoE or shared MoE), by tower and index."""
    vision = {("vision", i): block.mlp for i, block in enumerate(model.vision.blocks)}
    decoder = {("decoder", i): layer.mlp for i, layer in enumerate(decoder_layers(model.language_model))}
    return vision | decoder


def _is_moe(mlp: nn.Module) -> bool:
    return isinstance(mlp, (MoELayer, SharedMoE))


def _prefixes(model: nn.Module, modules: list[nn.Module]) -> tuple[str, ...]:
    ids = {id(m) for m in modules}
    return tuple(f"{name}." for name, m in model.named_modules() if id(m) in ids)


def load_parent(model: VLMoEForConditionalGeneration, parent: VLMoEForConditionalGeneration) -> None:
    """Load every parameter and buffer of ``parent`` into ``model`` but the dense MLPs that ``model``
    upcycled (built with ``parent=parent``); raises ``ValueError`` naming what does not match."""
    mine, theirs = _mlps(model), _mlps(parent)
    upcycled = [p for p, mlp in mine.items() if _is_moe(mlp) and p in theirs and not _is_moe(theirs[p])]
    new_layers = [mine[p].layer if isinstance(mine[p], SharedMoE) else mine[p] for p in upcycled]
    skip_mine, skip_theirs = _prefixes(model, new_layers), _prefixes(parent, [theirs[p] for p in upcycled])
    want = {k: v for k, v in model.state_dict().items() if not k.startswith(skip_mine)}
    have = {k: v for k, v in parent.state_dict().items() if not k.startswith(skip_theirs)}
    problems = []
    if missing := sorted(set(want) - set(have)):
        problems.append(f"missing in the checkpoint: {missing}")
    if unexpected := sorted(set(have) - set(want)):
        problems.append(f"in the checkpoint but not in the new model: {unexpected}")
    if shapes := [f"{k} {tuple(have[k].shape)} -> {tuple(want[k].shape)}" for k in sorted(set(want) & set(have))
                  if have[k].shape != want[k].shape]:
        problems.append(f"shape mismatch (checkpoint -> new model): {shapes}")
    if problems:
        raise ValueError("parameters that cannot be matched to the checkpoint; " + "; ".join(problems))
    model.load_state_dict(have, strict=False)


@torch.no_grad()
def max_logit_difference(model: nn.Module, parent: nn.Module, batch: dict[str, Tensor]) -> float:
    """The largest absolute difference between two models' logits at the data positions of one batch
    (0 for an exact upcycle; at padding a MoE layer computes nothing where a dense MLP computes)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    was_training = model.training, parent.training
    model.eval(), parent.eval()
    try:
        diff = (model(**inputs).logits.float() - parent(**inputs).logits.float()).abs()  # (B, T, V)
        mask = inputs.get("attention_mask")
        return (diff if mask is None else diff[mask.bool()]).max().item()
    finally:
        model.train(was_training[0]), parent.train(was_training[1])
