"""The two towers and what joins them: a timm ViT adapter, a transformers decoder, a projector.

Notable choices:
- The ViT is a timm model behind a thin adapter: built by name with ``timm.create_model``
  (never ``pretrained=True`` against a hub; a local weights file goes through timm's own
  ``pretrained_cfg_overlay``, which also resamples position embeddings to a new image size).
- The decoder is whatever ``AutoModelForCausalLM`` builds from a local folder or a config dict.
- Which MLPs become MoE, upcycling (from the towers' own pretrained MLPs or from a parent vlmoe
  model's) and cross-tower sharing are decided in ``place_moe_layers``. Upcycled experts follow
  their dense MLP's kind, which the towers' configs then record, so a saved model reloads alone.
  A shared layer is owned once by the model (``shared_moe``) and referenced from both towers
  through ``SharedMoE``: its parameters appear once in ``state_dict()``, ``parameters()`` and
  the checkpoint, and receive gradients from both towers.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import timm
import torch
import torch.nn.functional as F
from timm.layers import HybridEmbed, build_sincos2d_pos_embed
from timm.models.vision_transformer_hybrid import ConvStem
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..moe import MoEConfig, MoELayer, SharedMoE, moe_layers_of
from ..moe.layer import dense_weights
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
        # Offline: no kernels from the Hub (transformers >= 5.25 kernelizes a loaded model by default).
        return AutoModelForCausalLM.from_pretrained(config.pretrained_path, local_files_only=True, use_kernels=False)
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
        self.positions = config.positions

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
        x = self.fc2(self.act(self.fc1(x)))
        if self.positions:  # computed, not stored: nothing to save, load or move between devices
            grid = [self.grid_size[0] // self.pool, self.grid_size[1] // self.pool]
            x = x + build_sincos2d_pos_embed(grid, x.shape[-1], device=x.device, dtype=x.dtype)
        return x


def _mlp_width(mlp: nn.Module) -> tuple[int, int]:
    """(in_features, hidden_features) of a timm or Llama-style dense MLP."""
    if hasattr(mlp, "fc1"):
        return mlp.fc1.in_features, mlp.fc1.out_features
    return mlp.gate_proj.in_features, mlp.gate_proj.out_features


def dense_mlps(blocks: nn.Module) -> dict[int, nn.Module]:
    """The dense MLPs of a tower's blocks, by block index (MoE layers left out)."""
    return {i: block.mlp for i, block in enumerate(blocks) if not isinstance(block.mlp, (MoELayer, SharedMoE))}


def same_dense_mlp(a: nn.Module, b: nn.Module) -> bool:
    """Whether two dense MLPs upcycle into the same experts: one expert type, one activation, equal weights."""
    *wa, type_a, act_a = dense_weights(a)
    *wb, type_b, act_b = dense_weights(b)
    if (type_a, act_a) != (type_b, act_b):
        return False
    return all(
        (x is None and y is None) or (x is not None and y is not None and x.shape == y.shape and torch.equal(x, y))
        for x, y in zip(wa, wb)
    )


def _tower_moe(moe: MoEConfig, config: VisionConfig | DecoderConfig) -> tuple[MoEConfig, str | None]:
    """The MoE config and expert activation of a tower's layers built at random."""
    if config.expert_type is not None:
        moe = dataclasses.replace(moe, expert_type=config.expert_type)
    return moe, config.expert_activation


def _make_moe(
    mlp: nn.Module, source: nn.Module | None, config: MoEConfig, activation: str | None, causal: bool,
    noise_std: float, where: str,
) -> MoELayer:
    """A MoE layer in place of the tower's dense ``mlp``: upcycled from ``source``, or at random."""
    width, hidden = _mlp_width(mlp)
    if source is not None:
        if _mlp_width(source) != (width, hidden):
            raise ValueError(
                f"{where}: the dense MLP to upcycle from has (in, hidden)={_mlp_width(source)}, the model's "
                f"{(width, hidden)}; experts keep the width of the MLP they are copied from"
            )
        return MoELayer.from_dense(source, config, causal=causal, noise_std=noise_std)
    param = next(mlp.parameters())
    return MoELayer(
        width, hidden, config=config, causal=causal, activation=activation, device=param.device, dtype=param.dtype
    )


def _record_expert_kind(layers: list[MoELayer], config: VisionConfig | DecoderConfig, where: str) -> None:
    """Write the tower's expert type and activation into its config, so that a saved model rebuilds
    the same layers (upcycled ones follow their dense MLP, not ``moe.expert_type``)."""
    kinds = sorted({(layer.config.expert_type, layer.experts.activation) for layer in layers})
    if len(kinds) > 1:
        raise ValueError(
            f"{where}: its MoE layers would hold experts of kinds {kinds} (upcycled layers follow their dense "
            f"MLP, the others {where}.expert_type / moe.expert_type); a tower holds one kind: choose "
            f"{where}.moe_layers so that all of its MoE layers are upcycled, or none"
        )
    if kinds:
        config.expert_type, config.expert_activation = kinds[0]


def place_moe_layers(
    vision: VisionTower,
    decoder: PreTrainedModel,
    vision_config: VisionConfig,
    decoder_config: DecoderConfig,
    moe: MoEConfig,
    share: bool,
    vision_sources: dict[int, nn.Module],
    decoder_sources: dict[int, nn.Module],
    noise_std: float = 0.0,
) -> list[MoELayer]:
    """Turn the chosen dense MLPs into MoE layers; returns the shared layers (to be owned by the model).

    ``vision_sources`` / ``decoder_sources``: the dense MLPs to upcycle from, by block index (the
    towers' own pretrained MLPs, or a parent model's); a MoE layer without one is built at random.
    ``noise_std`` is the relative Gaussian noise added to each upcycled expert. The towers' expert
    kinds are written into their configs.
    """
    vision_idx = moe_layer_indices(len(vision.blocks), vision_config.moe_layers, vision_config.moe_every, "vision")
    layers = decoder_layers(decoder)
    decoder_idx = moe_layer_indices(len(layers), decoder_config.moe_layers, decoder_config.moe_every, "decoder")
    if share:
        shared = _place_shared(vision, layers, vision_idx, decoder_idx, vision_config, decoder_config, moe,
                               vision_sources, decoder_sources, noise_std)
    else:
        shared = []
        v_moe, v_act = _tower_moe(moe, vision_config)
        for i in vision_idx:
            block = vision.blocks[i]
            block.mlp = _make_moe(block.mlp, vision_sources.get(i), v_moe, v_act, False, noise_std, f"vision block {i}")
        d_moe, d_act = _tower_moe(moe, decoder_config)
        for i in decoder_idx:
            source = decoder_sources.get(i)
            layers[i].mlp = _make_moe(layers[i].mlp, source, d_moe, d_act, True, noise_std, f"decoder layer {i}")
    _record_expert_kind(moe_layers_of(vision.blocks), vision_config, "vision")
    _record_expert_kind(moe_layers_of(layers), decoder_config, "decoder")
    return shared


def _place_shared(
    vision: VisionTower, layers: nn.ModuleList, vision_idx: list[int], decoder_idx: list[int],
    vision_config: VisionConfig, decoder_config: DecoderConfig, moe: MoEConfig,
    vision_sources: dict[int, nn.Module], decoder_sources: dict[int, nn.Module], noise_std: float,
) -> list[MoELayer]:
    """The i-th ViT and decoder MoE layers as one module; upcycled from the dense MLP one tower gives,
    or from both towers' only if they are equal (one layer has one parent)."""
    if len(vision_idx) != len(decoder_idx):
        raise ValueError(
            f"share_moe_layers needs as many MoE layers in the ViT ({len(vision_idx)}) as in the decoder "
            f"({len(decoder_idx)}); set vision/decoder moe_layers or moe_every to match"
        )
    kinds = [(c.expert_type, c.expert_activation) for c in (vision_config, decoder_config)]
    if kinds[0] != kinds[1]:
        raise ValueError(
            f"share_moe_layers: vision.expert_type/expert_activation ({vision_config.expert_type}, "
            f"{vision_config.expert_activation}) differ from decoder's ({decoder_config.expert_type}, "
            f"{decoder_config.expert_activation}); a shared layer has one kind of experts"
        )
    shared_moe, activation = _tower_moe(moe, decoder_config)
    shared = []
    for vi, di in zip(vision_idx, decoder_idx):
        v_mlp, d_mlp = vision.blocks[vi].mlp, layers[di].mlp
        if _mlp_width(v_mlp) != _mlp_width(d_mlp):
            raise ValueError(
                f"share_moe_layers: ViT block {vi} MLP (in, hidden)={_mlp_width(v_mlp)} differs from decoder "
                f"layer {di} MLP {_mlp_width(d_mlp)}; shared layers need equal widths"
            )
        v_src, d_src = vision_sources.get(vi), decoder_sources.get(di)
        if v_src is not None and d_src is not None and not same_dense_mlp(v_src, d_src):
            raise ValueError(
                f"share_moe_layers: shared layer {len(shared)} would be upcycled from ViT block {vi}'s dense MLP "
                f"and from decoder layer {di}'s, and they differ (a timm GELU MLP and a Llama SwiGLU MLP always "
                "do); a shared layer can have one parent only: set share_moe_layers=false"
            )
        source = d_src if d_src is not None else v_src
        layer = _make_moe(d_mlp, source, shared_moe, activation, True, noise_std, f"shared layer {len(shared)}")
        vision.blocks[vi].mlp = SharedMoE(layer)
        layers[di].mlp = SharedMoE(layer)
        shared.append(layer)
    return shared
