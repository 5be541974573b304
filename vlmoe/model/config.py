"""``VLMoEConfig``: a transformers config composed of four small dataclasses.

Notable choices:
- The parts (``vision``, ``decoder``, ``projector``, ``moe``) are plain dataclasses validated in
  ``__post_init__``; ``VLMoEConfig`` accepts them or dicts and serialises them as dicts, so
  ``config.json`` round-trips through ``save_pretrained`` / ``from_pretrained``.
- Which layers become MoE: ``moe_layers`` (explicit indices) or ``moe_every`` (every n-th layer,
  counting from the last: ``moe_every=2`` in a 4-layer tower picks layers 1 and 3).
- Pretrained towers come only from local paths. Once a model has been built from them, the
  model's own config forgets the paths and keeps the resolved architecture (``text_config``),
  so a saved model reloads from its own folder alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from ..moe import MoEConfig
from ..moe.config import EXPERT_TYPES
from ..moe.experts import EXPERT_ACTIVATIONS

CAPTION_PROMPT = "Caption:"
VQA_PROMPT = "Question: {question} Answer:"
IMAGE_SLOT = "{image}"  # where a prompt template puts the image tokens; without it they come first


def moe_layer_indices(num_layers: int, moe_layers: list[int] | None, moe_every: int, where: str) -> list[int]:
    """The indices of the layers that become MoE, validated against ``num_layers``."""
    if moe_layers is not None:
        bad = [i for i in moe_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"{where}.moe_layers={moe_layers}: indices {bad} outside [0, {num_layers})")
        return sorted(set(moe_layers))
    if moe_every <= 0:
        return []
    return [i for i in range(num_layers) if (num_layers - 1 - i) % moe_every == 0]


def check_expert_kind(expert_type: str | None, activation: str | None, where: str) -> None:
    if expert_type is not None and expert_type not in EXPERT_TYPES:
        raise ValueError(f"{where}.expert_type={expert_type!r} is not one of {list(EXPERT_TYPES)}")
    if activation is not None and activation not in EXPERT_ACTIVATIONS:
        raise ValueError(f"{where}.expert_activation={activation!r} is not one of {list(EXPERT_ACTIVATIONS)}")


@dataclass
class VisionConfig:
    """The timm ViT encoder.

    Attributes:
        model_name: a timm model name (architecture only; no weights are fetched).
        img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio: overrides of the timm
            architecture (``None`` keeps the model's own value).
        pretrained_file: a local timm weights file (.safetensors/.pth/.bin) to load; hub names
            are refused.
        conv_stem: channels of a convolutional stem (3x3 convolutions of stride 2, timm's
            ``ConvStem``; Xiao et al. 2021, "Early convolutions help transformers see better") in
            place of the linear patch embedding; ``patch_size`` then counts stem output pixels, so
            a patch covers ``patch_size * 2 ** len(conv_stem)`` image pixels. ``None``: no stem.
        moe_layers / moe_every: which blocks become MoE.
        expert_type / expert_activation: the kind of this tower's MoE experts (``None``:
            ``moe.expert_type`` and its default activation). Upcycling sets them to the dense MLP's,
            so a saved model rebuilds the layers it holds.
        image_mean, image_std, interpolation, crop_pct: preprocessing; ``None`` takes timm's
            data config of the model.
        grid_size: patch tokens per side, resolved from the built model (hybrid ViTs with a
            convolutional stem have fewer than ``img_size // patch_size``).
    """

    model_name: str = "vit_tiny_patch16_224"
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    pretrained_file: str | None = None
    conv_stem: list[int] | None = None
    moe_layers: list[int] | None = None
    moe_every: int = 0
    expert_type: str | None = None
    expert_activation: str | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    grid_size: int | None = None

    def __post_init__(self) -> None:
        if self.pretrained_file is not None and not os.path.isfile(self.pretrained_file):
            raise ValueError(
                f"vision.pretrained_file={self.pretrained_file!r} is not a local file; vlmoe loads tower "
                "weights from local paths only (nothing is downloaded)"
            )
        if self.moe_every < 0:
            raise ValueError(f"vision.moe_every must be >= 0, got {self.moe_every}")
        check_expert_kind(self.expert_type, self.expert_activation, "vision")
        self.check_patch_grid()

    def check_patch_grid(self) -> None:
        """The image must be a whole number of patches: timm would silently crop the rest.

        Checked here when both sizes are set, and again by ``VisionTower.resolve`` once timm has
        filled in its defaults.
        """
        if self.img_size is None or self.patch_size is None:
            return
        stem = len(self.conv_stem or [])
        patch = self.patch_size * 2**stem  # image pixels a token covers
        if self.img_size % patch:
            covers = f"vision.patch_size={self.patch_size}" + (f" x 2**len(vision.conv_stem)={2**stem}" if stem else "")
            raise ValueError(
                f"vision.img_size={self.img_size} is not a multiple of the patch ({covers} = {patch} px): "
                f"timm would silently crop the last {self.img_size % patch} px of each image"
            )

    def timm_kwargs(self) -> dict[str, Any]:
        names = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass
class DecoderConfig:
    """The transformers causal-LM decoder (Llama family).

    Attributes:
        pretrained_path: a local ``save_pretrained`` directory (model and tokenizer); hub names
            are refused.
        text_config: a transformers config dict (with ``model_type``, default ``llama``) for a
            decoder built from scratch, or the resolved config of a loaded one.
        moe_layers / moe_every: which layers become MoE.
        expert_type / expert_activation: as ``VisionConfig``'s, for the decoder's MoE layers.
    """

    pretrained_path: str | None = None
    text_config: dict[str, Any] = field(default_factory=dict)
    moe_layers: list[int] | None = None
    moe_every: int = 0
    expert_type: str | None = None
    expert_activation: str | None = None

    def __post_init__(self) -> None:
        check_expert_kind(self.expert_type, self.expert_activation, "decoder")
        if self.pretrained_path is not None and not os.path.isdir(self.pretrained_path):
            raise ValueError(
                f"decoder.pretrained_path={self.pretrained_path!r} is not a local directory; vlmoe loads "
                "decoders from local save_pretrained folders only (nothing is downloaded)"
            )
        if self.moe_every < 0:
            raise ValueError(f"decoder.moe_every must be >= 0, got {self.moe_every}")
        self._check_text_config_keys()

    def _check_text_config_keys(self) -> None:
        """Refuse keys the transformers config class does not have: it would store a typo and ignore it.

        A key is unknown when it adds an attribute that the class's default config lacks; legacy
        names that transformers folds into others (``rope_theta``) and aliases pass.
        """
        text_config = dict(self.text_config)
        model_type = text_config.pop("model_type", "llama")
        try:
            default = AutoConfig.for_model(model_type)
        except ValueError as err:
            raise ValueError(f"decoder.text_config.model_type={model_type!r}: {err}") from None
        added = set(AutoConfig.for_model(model_type, **text_config).to_dict()) - set(default.to_dict())
        if added:
            hints = {k: difflib.get_close_matches(k, default.to_dict(), n=1) for k in sorted(added)}
            hints = "".join(f"; {k!r}: did you mean {m[0]!r}?" for k, m in hints.items() if m)
            raise ValueError(
                f"decoder.text_config: unknown key(s) {sorted(added)} for model_type {model_type!r} "
                f"({type(default).__name__}){hints}"
            )

    def transformers_config(self) -> PreTrainedConfig:
        """The decoder's transformers config: the pretrained folder's, or built from ``text_config``."""
        if self.pretrained_path is not None:
            return AutoConfig.from_pretrained(self.pretrained_path, local_files_only=True)
        text_config = dict(self.text_config)
        return AutoConfig.for_model(text_config.pop("model_type", "llama"), **text_config)


@dataclass
class ProjectorConfig:
    """Vision features -> decoder embeddings.

    Attributes:
        hidden_features: the projector MLP's hidden width (``None``: the decoder width).
        pool: merge each ``pool x pool`` block of patches into one image token (1 = keep all).
        merge: how a block becomes one token: ``avg`` (average pooling) or ``shuffle``
            (space-to-depth: the block's features side by side, nothing thrown away; nanoVLM, Idefics3).
        positions: add each image token's row and column (a fixed 2-D sine-cosine embedding, MAE's)
            to its embedding. The decoder's own positions number the tokens in one line, which
            lets attention find "the token on the left" but not say where a token it found is;
            a from-scratch ViT's learned position embedding stays too small to carry it.
    """

    hidden_features: int | None = None
    pool: int = 1
    merge: str = "avg"
    positions: bool = False

    def __post_init__(self) -> None:
        if self.pool < 1:
            raise ValueError(f"projector.pool must be >= 1, got {self.pool}")
        if self.merge not in ("avg", "shuffle"):
            raise ValueError(f"projector.merge={self.merge!r} is not one of ['avg', 'shuffle']")


def check_shared_moe_layers(vision: VisionConfig, decoder: DecoderConfig) -> None:
    """Shared MoE layers need as many MoE layers and equal MLP widths in both towers.

    Checked from the config, before anything is built or written, as far as the config tells;
    what only the built towers tell (timm's defaults) ``towers.place_moe_layers`` checks again.
    """
    text = decoder.transformers_config()
    if vision.depth is not None:
        num_vision = len(moe_layer_indices(vision.depth, vision.moe_layers, vision.moe_every, "vision"))
        num_decoder = len(moe_layer_indices(text.num_hidden_layers, decoder.moe_layers, decoder.moe_every, "decoder"))
        if num_vision != num_decoder:
            raise ValueError(
                f"share_moe_layers needs as many MoE layers in the ViT ({num_vision}, from vision.depth, "
                f"vision.moe_layers/moe_every) as in the decoder ({num_decoder}, from decoder.text_config."
                "num_hidden_layers, decoder.moe_layers/moe_every)"
            )
    if vision.embed_dim is None or vision.mlp_ratio is None:
        return
    vision_width = (vision.embed_dim, int(vision.embed_dim * vision.mlp_ratio))  # timm Block's Mlp
    decoder_width = (text.hidden_size, text.intermediate_size)
    if vision_width != decoder_width:
        raise ValueError(
            f"share_moe_layers needs equal MLP widths: the ViT's (vision.embed_dim, vision.embed_dim * "
            f"vision.mlp_ratio) = {vision_width} differs from the decoder's (decoder.text_config.hidden_size, "
            f"intermediate_size) = {decoder_width}"
        )


_PARTS = {"vision": VisionConfig, "decoder": DecoderConfig, "projector": ProjectorConfig, "moe": MoEConfig}


def _as_part(name: str, value: Any):
    cls = _PARTS[name]
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{name}: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**value)
    raise ValueError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")


def task_prompt(caption_prompt: str, vqa_prompt: str, question: str | None = None) -> str:
    """The prompt for captioning (no question) or VQA; it keeps the template's ``{image}`` slot, if any."""
    return caption_prompt if question is None else vqa_prompt.replace("{question}", question)


def check_prompts(caption_prompt: str, vqa_prompt: str) -> None:
    """Each template holds ``{image}`` at most once; the VQA one holds ``{question}``."""
    for name, template in (("caption_prompt", caption_prompt), ("vqa_prompt", vqa_prompt)):
        if template.count(IMAGE_SLOT) > 1:
            raise ValueError(f"{name} {template!r}: {IMAGE_SLOT} may appear once (where the image tokens go)")
    if "{question}" not in vqa_prompt:
        raise ValueError(f"vqa_prompt {vqa_prompt!r} must contain {{question}}")


IMAGE_POSITION_IDS = ("sequential", "shared")


class VLMoEConfig(PreTrainedConfig):
    """The whole vision-language MoE model.

    Attributes:
        vision, decoder, projector, moe: the parts (dataclasses; dicts are accepted).
        share_moe_layers: the i-th MoE layer of the ViT and of the decoder are one module.
        image_token: the placeholder token that marks image positions in ``input_ids``.
        caption_prompt, vqa_prompt: prompt templates (``{question}`` is filled in for VQA); ``{image}``
            places the image tokens inside the prompt (default: before it).
        max_text_length: the longest prompt + target the processor makes.
        pixel_loss_weight: weight of the auxiliary loss in which each image token reconstructs its
            block of the image (``VLMoEForConditionalGeneration._pixel_loss``); 0 = off.
        pixel_loss_size: the pixels a side each image token reconstructs (its block, average-pooled);
            ``None``: the block at the image's resolution.
        image_position_ids: the decoder positions of an image's tokens: ``sequential`` (one each, in
            reading order) or ``shared`` (all at one position; the text after goes on from the next).
            Shared, attention finds an image token by what it holds, not by how far back it is;
            where a token lies in the image is then told by ``projector.positions``.
    """

    model_type = "vlmoe"

    vision: Any = None
    decoder: Any = None
    projector: Any = None
    moe: Any = None
    share_moe_layers: bool = False
    image_token: str = "<image>"
    image_token_id: int | None = None
    caption_prompt: str = CAPTION_PROMPT
    vqa_prompt: str = VQA_PROMPT
    max_text_length: int = 64
    pixel_loss_weight: float = 0.0
    pixel_loss_size: int | None = None
    image_position_ids: str = "sequential"

    def __post_init__(self, **kwargs):
        for name in _PARTS:
            setattr(self, name, _as_part(name, getattr(self, name)))
        if self.share_moe_layers:
            check_shared_moe_layers(self.vision, self.decoder)
        check_prompts(self.caption_prompt, self.vqa_prompt)
        if self.pixel_loss_weight < 0:
            raise ValueError(f"pixel_loss_weight must be >= 0, got {self.pixel_loss_weight}")
        if self.pixel_loss_size is not None and self.pixel_loss_size < 1:
            raise ValueError(f"pixel_loss_size must be >= 1, got {self.pixel_loss_size}")
        if self.image_position_ids not in IMAGE_POSITION_IDS:
            raise ValueError(f"image_position_ids={self.image_position_ids!r} is not one of {list(IMAGE_POSITION_IDS)}")
        super().__post_init__(**kwargs)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The decoder's transformers config (what generation and embedding utilities look for)."""
        text_config = dict(self.decoder.text_config)
        return AutoConfig.for_model(text_config.pop("model_type", "llama"), **text_config)

    @property
    def num_image_tokens(self) -> int:
        """Image placeholder tokens per image (needs the resolved ``vision.grid_size``)."""
        side = self.vision.grid_size // self.projector.pool
        return side * side

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in _PARTS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out
