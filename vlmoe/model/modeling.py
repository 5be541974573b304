"""``VLMoEForConditionalGeneration``: [image tokens ; prompt ; target] through a MoE decoder.

Notable choices:
- Image positions are marked in ``input_ids`` by ``config.image_token_id`` placeholders (one
  per projected image token); their embeddings are replaced by the projected ViT features.
  Batches pad on the left for generation, and ``generate()`` is transformers' own: the prefill
  holds image and prompt, later steps are text only (``pixel_values`` is dropped after prefill).
- Every MoE layer learns each position's modality through ``moe_scope``, set around each tower
  call: ViT tokens are modality 0; decoder positions are 0 at image placeholders, 1 elsewhere,
  and ``PADDING`` where the attention mask is 0, so padding reaches no expert, loss or statistic.
- The loss is assembled in one place, ``_losses``: LM loss on target tokens (labels -100
  elsewhere; their mean, or their sum over ``num_items_in_batch`` as transformers' models take
  it, so that a trainer gets the mean over the target tokens of a whole optimizer step; with
  ``label_weights``, the weighted mean or weighted sum, e.g. every sample weighing the same), plus
  the load-balancing and z-losses averaged over MoE calls and weighted by ``config.moe``, and the
  optional pixel loss (``config.pixel_loss_weight``); each term is also returned on its own,
  with per-layer routing statistics.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..moe import PADDING, MoELayer, MoEOutput, moe_layers_of, moe_scope
from ..moe.experts import reused_casts
from .config import VLMoEConfig
from .towers import Projector, VisionTower, build_decoder, decoder_layers, dense_mlps, place_moe_layers

IMAGE, TEXT = 0, 1


@dataclass
class RoutingRecord:
    """One MoE layer call: which tower called which layer, and what the router did."""

    tower: str
    layer: int
    output: MoEOutput


@dataclass
class VLMoEOutput(CausalLMOutputWithPast):
    # The KV cache field keeps the decoder's own name (``cache`` since transformers 5.24,
    # ``past_key_values`` before): the decoder's output is passed through as it is.
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    z_loss: Tensor | None = None
    pixel_loss: Tensor | None = None
    routing: list[RoutingRecord] | None = None


def decoder_modality(is_image: Tensor, attention_mask: Tensor | None) -> Tensor:
    """``(B, T)``: IMAGE at image placeholders, TEXT elsewhere, PADDING where the mask is 0."""
    modality = torch.where(is_image, IMAGE, TEXT)  # (B, T)
    if attention_mask is None:
        return modality
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be (batch, positions) with 0 at padding, got shape {tuple(attention_mask.shape)}: "
            "the MoE layers read padding off it"
        )
    is_data = attention_mask[:, -modality.shape[1] :].bool()  # with a KV cache, the mask covers past positions too
    return modality.masked_fill(~is_data, PADDING)


def shared_image_position_ids(is_image: Tensor) -> Tensor:
    """``(B, T)`` decoder positions in which every token of an image takes the position of its first
    token and the text after it goes on from the next one. Only differences of positions matter to
    rotary embeddings, so left or right padding changes nothing."""
    continues_image = is_image & F.pad(is_image[:, :-1], (1, 0), value=False)
    return (~continues_image).long().cumsum(-1) - 1


def target_weights(labels: Tensor, power: float = 0.0) -> Tensor:
    """``(B, T)`` loss weights: ``n ** -power`` at each of a row's ``n`` target positions, 0 elsewhere
    (power 0: every target token counts the same; 1: every sample does)."""
    is_target = labels != -100
    count = is_target.sum(-1, keepdim=True).clamp(min=1).float()
    return is_target * count.pow(-power)


class VLMoEPreTrainedModel(PreTrainedModel):
    config_class = VLMoEConfig
    config: VLMoEConfig
    base_model_prefix = "vlmoe"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules = ["Block", "LlamaDecoderLayer", "MoELayer"]

    def _init_weights(self, module: nn.Module) -> None:
        # Every part initialises itself when built (timm, transformers, MoE layers); nothing to add.
        return

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Hub kernels are downloads, and vlmoe loads offline: transformers >= 5.25 kernelizes by
        # default, so the default here stays off (``use_kernels=True`` opts in).
        kwargs.setdefault("use_kernels", False)
        return super().from_pretrained(*args, **kwargs)


class VLMoEForConditionalGeneration(VLMoEPreTrainedModel, GenerationMixin):
    """A timm ViT and a transformers causal LM joined by a projector, with modality-aware MoE layers."""

    def __init__(
        self, config: VLMoEConfig, parent: VLMoEForConditionalGeneration | None = None, upcycle_noise: float = 0.0
    ):
        """``parent``: a vlmoe model with the same towers, whose dense MLPs the MoE layers placed where
        it has them are upcycled from (``vlmoe.model.upcycle.load_parent`` loads the rest of its
        weights); ``upcycle_noise``: the relative Gaussian noise added to each upcycled expert."""
        # The model resolves its own copy (tower paths -> architecture), so the caller's config
        # still names the pretrained towers and builds the same model again.
        config = copy.deepcopy(config)
        super().__init__(config)
        pretrained = config.vision.pretrained_file is not None, config.decoder.pretrained_path is not None
        if parent is not None and any(pretrained):
            raise ValueError("a parent model and vision.pretrained_file / decoder.pretrained_path both give tower "
                             "weights: upcycle from one of them")
        self.vision = VisionTower(config.vision)
        self.vision.resolve(config.vision)
        self.language_model = build_decoder(config.decoder)
        text_config = self.language_model.config
        config.decoder.text_config = text_config.to_diff_dict() | {"model_type": text_config.model_type}
        config.decoder.pretrained_path = None
        self.projector = Projector(self.vision.vit.embed_dim, text_config.hidden_size, self.vision.grid_size, config.projector)
        # Each image token reconstructs its own block of pixels (``_pixel_loss``); only built when used.
        block = config.vision.img_size // self.vision.grid_size[0] * config.projector.pool  # image pixels a side
        self.pixel_block_size = config.pixel_loss_size or block
        self.pixel_head = (
            nn.Linear(text_config.hidden_size, 3 * self.pixel_block_size**2) if config.pixel_loss_weight else None
        )
        self.post_init()
        # After post_init: the decoder's own init scheme would otherwise re-initialise the new
        # layers' nn.Linear modules (e.g. zeroed shared experts of an upcycled layer).
        vision_sources, decoder_sources = self._dense_sources(config, parent, *pretrained)
        shared = place_moe_layers(
            self.vision, self.language_model, config.vision, config.decoder, config.moe,
            config.share_moe_layers, vision_sources, decoder_sources, upcycle_noise,
        )
        self.shared_moe = nn.ModuleList(shared)

    def _dense_sources(
        self, config: VLMoEConfig, parent: VLMoEForConditionalGeneration | None, vision_pretrained: bool,
        decoder_pretrained: bool,
    ) -> tuple[dict[int, nn.Module], dict[int, nn.Module]]:
        """The dense MLPs the MoE layers are upcycled from, by block index: the parent's, or the
        pretrained towers' own. Where the parent holds a MoE layer, the new one is built like it
        (its tower's expert kind), to be loaded from it."""
        if parent is not None:
            for mine, theirs in ((config.vision, parent.config.vision), (config.decoder, parent.config.decoder)):
                if mine.expert_type is None and mine.expert_activation is None:
                    mine.expert_type, mine.expert_activation = theirs.expert_type, theirs.expert_activation
            return dense_mlps(parent.vision.blocks), dense_mlps(decoder_layers(parent.language_model))
        vision = dense_mlps(self.vision.blocks) if vision_pretrained else {}
        decoder = dense_mlps(decoder_layers(self.language_model)) if decoder_pretrained else {}
        return vision, decoder

    # --- parts ---------------------------------------------------------------------------

    @property
    def num_image_tokens(self) -> int:
        return self.projector.num_tokens

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def moe_layers(self) -> dict[str, list[MoELayer]]:
        """The MoE layers each tower calls, in order (a shared layer appears under both)."""
        vision = [moe_layers_of(block.mlp) for block in self.vision.blocks]
        decoder = [moe_layers_of(layer.mlp) for layer in decoder_layers(self.language_model)]
        return {"vision": [m for ms in vision for m in ms], "decoder": [m for ms in decoder for m in ms]}

    # --- forward -------------------------------------------------------------------------

    def encode_images(self, pixel_values: Tensor) -> tuple[Tensor, list[MoEOutput]]:
        """``(B, 3, H, W)`` -> image token embeddings ``(B, P', D)`` and the ViT's MoE outputs."""
        with moe_scope(self.vision, IMAGE) as records:
            features = self.vision(pixel_values.to(self.dtype))
        return self.projector(features), records

    def forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        num_items_in_batch: Tensor | float | None = None,
        label_weights: Tensor | None = None,
        **kwargs,
    ) -> VLMoEOutput:
        if input_ids is None:
            raise ValueError("input_ids are required: image positions are marked by image placeholder tokens")
        is_image = input_ids == self.config.image_token_id
        vision_records: list[MoEOutput] = []
        image_embeds = None
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, T, D)
            if pixel_values is not None:
                image_embeds, vision_records = self.encode_images(pixel_values)
                inputs_embeds = self._merge_image_embeds(inputs_embeds, image_embeds, is_image)
        if position_ids is None and self.config.image_position_ids == "shared":
            position_ids = shared_image_position_ids(is_image)
            if attention_mask is None:  # transformers would read repeated positions as packed sequences
                attention_mask = torch.ones_like(input_ids)
        modality = decoder_modality(is_image, attention_mask)  # (B, T)
        with moe_scope(self.language_model, modality) as decoder_records:
            out = self.language_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=logits_to_keep, **kwargs,  # the KV cache and use_cache, by whichever name
            )
        routing = self._routing(vision_records, decoder_records)
        losses = self._losses(out.logits, labels, routing, image_embeds, pixel_values, num_items_in_batch, label_weights)
        return VLMoEOutput(**out, routing=routing, **losses)

    def generate(self, *args, **kwargs):
        """transformers' ``generate``; under autocast each expert parameter is cast once for the call,
        as autocast does for the dense weights (``reused_casts``)."""
        with reused_casts():
            return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: Tensor, *args, **kwargs) -> dict:
        """transformers' own, with shared image positions numbered over the whole sequence so far
        (the new tokens' positions continue the prefill's)."""
        if self.config.image_position_ids == "shared":
            kwargs["position_ids"] = shared_image_position_ids(input_ids == self.config.image_token_id)
        return super().prepare_inputs_for_generation(input_ids, *args, **kwargs)

    def _merge_image_embeds(self, inputs_embeds: Tensor, image_embeds: Tensor, is_image: Tensor) -> Tensor:
        # Checked eagerly only: under torch.compile the count read on the host would break the graph
        # (transformers' LLaVA checks likewise).
        expected = None if torch.compiler.is_compiling() else int(is_image.sum())
        if expected is not None and expected != image_embeds.shape[0] * image_embeds.shape[1]:
            raise ValueError(
                f"input_ids hold {expected} image placeholder tokens but pixel_values give "
                f"{image_embeds.shape[0]} images x {image_embeds.shape[1]} tokens"
            )
        mask = is_image.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_embeds.to(inputs_embeds.dtype))

    @staticmethod
    def _routing(vision_records: list[MoEOutput], decoder_records: list[MoEOutput]) -> list[RoutingRecord]:
        # MoE layers run in the order the tower holds them, one call per layer per forward.
        return [
            RoutingRecord(tower, i, record)
            for tower, records in (("vision", vision_records), ("decoder", decoder_records))
            for i, record in enumerate(records)
        ]

    def _losses(
        self,
        logits: Tensor,
        labels: Tensor | None,
        routing: list[RoutingRecord],
        image_embeds: Tensor | None,
        pixel_values: Tensor | None,
        num_items_in_batch: Tensor | float | None = None,
        label_weights: Tensor | None = None,
    ) -> dict[str, Tensor | None]:
        if labels is None:  # generation: no loss terms (and no router statistics computed)
            return dict.fromkeys(("loss", "lm_loss", "aux_loss", "z_loss", "pixel_loss"))
        moe = self.config.moe
        aux = z = None
        if routing:
            aux = moe.aux_loss_weight * torch.stack([r.output.load_balance_loss for r in routing]).mean()
            z = moe.z_loss_weight * torch.stack([r.output.z_loss for r in routing]).mean()
        labels = labels.to(logits.device)
        weights = target_weights(labels) if label_weights is None else label_weights.to(logits.device)
        token_losses = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="none",
        )
        weights = weights[:, 1:].flatten()
        lm = (token_losses * weights).sum() / (weights.sum() if num_items_in_batch is None else num_items_in_batch)
        loss = lm if aux is None else lm + aux + z
        pixel = None
        if self.pixel_head is not None and image_embeds is not None:
            pixel = self.config.pixel_loss_weight * self._pixel_loss(image_embeds, pixel_values)
            loss = loss + pixel
        return {"loss": loss, "lm_loss": lm, "aux_loss": aux, "z_loss": z, "pixel_loss": pixel}

    def _pixel_loss(self, image_embeds: Tensor, pixel_values: Tensor) -> Tensor:
        """Mean squared error of each image token's reconstruction of its block of the image.

        The image (as the ViT saw it, normalised; average-pooled to ``pixel_loss_size`` pixels a
        side per block if set) is cut into the image tokens' blocks, and a linear head reads each
        block's pixels off its token. It keeps what the language loss alone lets the image tokens
        drop (a colour the decoder has not learned to use yet) and asks for each block's layout
        (a shape's outline); it needs no labels.
        """
        grid = self.vision.grid_size[0] // self.projector.pool, self.vision.grid_size[1] // self.projector.pool
        size = self.pixel_block_size
        target = F.adaptive_avg_pool2d(pixel_values.float(), (grid[0] * size, grid[1] * size))  # (B, 3, gh*s, gw*s)
        target = F.pixel_unshuffle(target, size).flatten(2).transpose(1, 2)  # (B, P', 3*s*s)
        return F.mse_loss(self.pixel_head(image_embeds).float(), target)

    # --- bookkeeping ---------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, and parameters active per position (what each position pays), per tower."""

        def counts(module: nn.Module, moe_layers: list[MoELayer]) -> tuple[int, int]:
            own = {id(p): p for p in module.parameters()}
            for layer in moe_layers:  # shared layers are held outside the tower
                own.update({id(p): p for p in layer.parameters()})
            total = sum(p.numel() for p in own.values())
            inactive = 0
            for layer in moe_layers:
                experts = sum(p.numel() for p in layer.experts.parameters())
                inactive += experts - experts * layer.config.top_k // layer.config.num_experts
            return total, total - inactive

        layers = self.moe_layers()
        v_total, v_active = counts(self.vision, layers["vision"])
        d_total, d_active = counts(self.language_model, layers["decoder"])
        p_total = sum(p.numel() for p in self.projector.parameters())
        return {
            "total": sum(p.numel() for p in self.parameters()),
            "vision_total": v_total, "vision_active": v_active,
            "decoder_total": d_total, "decoder_active": d_active,
            "projector": p_total,
        }
