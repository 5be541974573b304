"""The two towers and what joins them: a timm ViT adapter, a transformers decoder, a projector.

Notable choices:
- The ViT is a timm model behind a thin adapter: built by name with ``timm.create_model``
  (never ``pretrained=True`` against a hub; a local weights file goes through timm's own
  ``pretrained_cfg_overlay``, which also resamples position embeddings to a new image size).
- The decoder is whatever ``AutoModelForCausalLM`` builds from a local folder or a config dict.
- Which MLPs become MoE, upcycling and cross-tower sharing are decided in ``place_moe_layers``.
  A shared layer is owned once by the model (``shared_moe``) and referenced from both towers
  through ``SharedMoE``: its parameters appear once in ``state_dict()``, ``parameters()`` and
  the checkpoint, and receive gradients from both towers.
"""

from __future__ import annotations

from functools import partial

import timm
import torch
import torch.nn.functional as F
from timm.layers import HybridEmbed
from timm.models.vision_transformer_hybrid import ConvStem
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..moe import MoEConfig, MoELayer, SharedMoE
from .config import DecoderConfig, ProjectorConfig, VisionConfig, moe_layer_indices


class VisionTower(nn.Module):
    """A timm ViT that returns its patch tokens (prefix tokens such as CLS dropped)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.model_name.startswith(("hf-hub:", "hf_hub:")) or "/" in config.model_name:
            raise ValueError(
                f"vision.model_name={config.model_name!r} names a hub model; give a timm architecture name "
                "and a local vision.pretrained_file instead (nothing is downloaded)"
            )
        kwargs = config.timm_kwargs()
        if config.conv_stem:
            # timm's ConvStem as it is (BatchNorm + ReLU): with LayerNorm + GELU instead, the tiny
            # demo model learned far slower (docs/RESULTS.md, section 5).
            n = len(config.conv_stem)
            stem = ConvStem(depth=n, channels=tuple(config.conv_stem), stride=(2,) * n)
            kwargs["embed_layer"] = partial(HybridEmbed, backbone=stem)
        pretrained = config.pretrained_file is not None
        # custom_load off: a local file is a PyTorch state dict, not the JAX .npz that some
        # pretrained configs (vit_tiny's) name; timm < 1.0.31 kept the flag for file sources.
        overlay = {"file": config.pretrained_file, "num_classes": 0, "custom_load": False} if pretrained else None
        try:
            self.vit = timm.create_model(
                config.model_name, pretrained=pretrained, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs
            )
        except RuntimeError as err:
            raise ValueError(f"vision.model_name={config.model_name!r}: {err}") from err
        self.num_prefix_tokens = getattr(self.vit, "num_prefix_tokens", 0)

    @property
    def blocks(self) -> nn.Sequential:
        return self.vit.blocks

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        features = self.vit.forward_features(pixel_values)  # (B, prefix + P, Dv)
        return features[:, self.num_prefix_tokens :]  # (B, P, Dv)

    def resolve(self, config: VisionConfig) -> None:
        """Write the architecture and preprocessing timm chose into ``config`` (so it reloads alone)."""
        data = timm.data.resolve_model_data_config(self.vit)
        config.img_size = config.img_size or data["input_size"][-1]
        config.patch_size = config.patch_size or self.vit.patch_embed.patch_size[0]
        config.embed_dim = config.embed_dim or self.vit.embed_dim
        config.depth = config.depth or len(self.vit.blocks)
        config.image_mean = config.image_mean or list(data["mean"])
        config.image_std = config.image_std or list(data["std"])
        config.interpolation = config.interpolation or data["interpolation"]
        config.crop_pct = config.crop_pct or data["crop_pct"]
        config.grid_size = self.grid_size[0]
        config.pretrained_file = None
        config.check_patch_grid()  # now that timm's default sizes are known


def build_decoder(config: DecoderConfig) -> PreTrainedModel:
    """A causal LM from a local folder, or from ``text_config`` (random weights)."""
    if config.pretrained_path is not None:
        return AutoModelForCausalLM.from_pretrained(config.pretrained_path, local_files_only=True)
    return AutoModelForCausalLM.from_config(config.transformers_config())


def decoder_layers(decoder: PreTrainedModel) -> nn.ModuleList:
    return decoder.model.layers


class Projector(nn.Module):
    """Patch features ``(B, P, Dv)`` -> decoder embeddings ``(B, P / pool^2, D)`` (blocks averaged or stacked)."""

    def __init__(self, in_features: int, out_features: int, grid_size: tuple[int, int], config: ProjectorConfig):
        super().__init__()
        if grid_size[0] % config.pool or grid_size[1] % config.pool:
            raise ValueError(f"projector.pool={config.pool} does not divide the patch grid {grid_size}")
        hidden = config.hidden_features or out_features
        self.grid_size = grid_size
        self.pool = config.pool
        self.shuffle = config.merge == "shuffle"
        self.fc1 = nn.Linear(in_features * (config.pool**2 if self.shuffle else 1), hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_features)

    @property
    def num_tokens(self) -> int:
        return (self.grid_size[0] // self.pool) * (self.grid_size[1] // self.pool)

    def forward(self, x: Tensor) -> Tensor:
        if self.pool > 1:
            b, _, d = x.shape
            x = x.transpose(1, 2).reshape(b, d, *self.grid_size)  # (B, Dv, H, W)
            if self.shuffle:
                x = F.pixel_unshuffle(x, self.pool)  # (B, Dv * pool^2, H / pool, W / pool)
            else:
                x = F.avg_pool2d(x, self.pool)  # (B, Dv, H / pool, W / pool)
            x = x.flatten(2).transpose(1, 2)  # (B, P', Dv or Dv * pool^2)
        return self.fc2(self.act(self.fc1(x)))


def _mlp_width(mlp: nn.Module) -> tuple[int, int]:
    """(in_features, hidden_features) of a timm or Llama-style dense MLP."""
    if hasattr(mlp, "fc1"):
        return mlp.fc1.in_features, mlp.fc1.out_features
    return mlp.gate_proj.in_features, mlp.gate_proj.out_features


def _make_moe(mlp: nn.Module, config: MoEConfig, causal: bool, upcycle: bool) -> MoELayer:
    if upcycle:
        return MoELayer.from_dense(mlp, config, causal=causal)
    width, hidden = _mlp_width(mlp)
    param = next(mlp.parameters())
    return MoELayer(width, hidden, config=config, causal=causal, device=param.device, dtype=param.dtype)


def place_moe_layers(
    vision: VisionTower,
    decoder: PreTrainedModel,
    vision_config: VisionConfig,
    decoder_config: DecoderConfig,
    moe: MoEConfig,
    share: bool,
    upcycle_vision: bool,
    upcycle_decoder: bool,
) -> list[MoELayer]:
    """Turn the chosen dense MLPs into MoE layers; returns the shared layers (to be owned by the model)."""
    vision_idx = moe_layer_indices(len(vision.blocks), vision_config.moe_layers, vision_config.moe_every, "vision")
    layers = decoder_layers(decoder)
    decoder_idx = moe_layer_indices(len(layers), decoder_config.moe_layers, decoder_config.moe_every, "decoder")
    if not share:
        for i in vision_idx:
            vision.blocks[i].mlp = _make_moe(vision.blocks[i].mlp, moe, False, upcycle_vision)
        for i in decoder_idx:
            layers[i].mlp = _make_moe(layers[i].mlp, moe, True, upcycle_decoder)
        return []
    if len(vision_idx) != len(decoder_idx):
        raise ValueError(
            f"share_moe_layers needs as many MoE layers in the ViT ({len(vision_idx)}) as in the decoder "
            f"({len(decoder_idx)}); set vision/decoder moe_layers or moe_every to match"
        )
    shared = []
    for vi, di in zip(vision_idx, decoder_idx):
        v_mlp, d_mlp = vision.blocks[vi].mlp, layers[di].mlp
        if _mlp_width(v_mlp) != _mlp_width(d_mlp):
            raise ValueError(
                f"share_moe_layers: ViT block {vi} MLP (in, hidden)={_mlp_width(v_mlp)} differs from decoder "
                f"layer {di} MLP {_mlp_width(d_mlp)}; shared layers need equal widths"
            )
        if upcycle_vision and upcycle_decoder:
            raise ValueError(
                "share_moe_layers with both towers pretrained: a shared layer can be upcycled from one dense "
                "MLP only (and a timm GELU MLP and a Llama SwiGLU MLP are different expert types)"
            )
        source = d_mlp if upcycle_decoder or not upcycle_vision else v_mlp
        layer = _make_moe(source, moe, True, upcycle_decoder or upcycle_vision)
        vision.blocks[vi].mlp = SharedMoE(layer)
        layers[di].mlp = SharedMoE(layer)
        shared.append(layer)
    return shared
