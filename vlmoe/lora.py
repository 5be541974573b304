"""LoRA adapters through PEFT: attention, projector and the 3-D expert weights of MoE layers.

    pip install 'vlmoe[peft]'
    python train.py --config configs/tiny.yaml train.lora.rank=8 model.init_from=runs/tiny/final
    python -m vlmoe.lora merge runs/NAME/final runs/NAME/merged   # adapter + base -> one model

Notable choices:
- ``LoRAConfig.targets`` names parts of the model, not module names: ``attention`` (the ViT's
  ``attn.qkv``/``attn.proj`` and the decoder's ``q/k/v/o_proj``), ``projector``, ``experts``
  (each MoE layer's ``in_proj``/``out_proj`` ``[E, out, in]`` and its shared experts).
- Expert weights are ``nn.Parameter``s, not ``nn.Linear``s: PEFT adapts them through
  ``target_parameters`` (``lora.ParamWrapper``), one rank-``r`` update per expert, applied as a
  parametrization of the 3-D weight for the duration of each call, so both expert
  implementations (loop and grouped kernel) see ``W + scale * B @ A`` unchanged. PEFT cannot
  apply dropout there (it is not separable from the expert matmul), so ``dropout`` with
  ``experts`` is refused.
- A run saves the adapter alone (``runs/NAME/final``, PEFT's ``adapter_config.json`` and
  ``adapter_model.safetensors``) beside the model it adapts (``runs/NAME/base``, named in the
  adapter's config); ``merge`` folds the adapter into the base for export, as a plain vlmoe
  folder that ``eval.py``, the caption script and the Auto classes load.
- PEFT is imported only where adapters are made or loaded: it is an optional extra.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from torch import nn

LORA_TARGETS = {
    "attention": {"modules": ["attn.qkv", "attn.proj", "q_proj", "k_proj", "v_proj", "o_proj"]},
    "projector": {"modules": ["projector.fc1", "projector.fc2"]},
    "experts": {"modules": ["shared_experts.fc_in", "shared_experts.fc_out"],
                "parameters": ["experts.in_proj", "experts.out_proj"]},
}
BASE = "base"  # the run folder's copy of the model an adapter was trained on


@dataclass
class LoRAConfig:
    """Attributes:
    rank: the rank of each update (per expert for expert weights); 0 = no LoRA (full fine-tuning).
    alpha: the update is scaled by ``alpha / rank``.
    dropout: dropout on the adapters' input (attention and projector only; see the module notes).
    targets: parts to adapt, of ``LORA_TARGETS``; everything else is frozen.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention", "projector", "experts"])

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"train.lora.rank must be >= 0 (0: no LoRA), got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"train.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"train.lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"train.lora.targets={self.targets}: give one or more of {list(LORA_TARGETS)}")
        if self.dropout and "experts" in self.targets:
            raise ValueError(
                f"train.lora.dropout={self.dropout} with 'experts' in train.lora.targets: PEFT's adapters of the "
                "3-D expert weights take no dropout (it cannot be separated from the expert matmul); set dropout=0 "
                "or drop 'experts' from the targets"
            )

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs PEFT: pip install 'vlmoe[peft]'") from None
    return peft


def peft_config(config: LoRAConfig, model: nn.Module):
    """PEFT's ``LoraConfig`` for ``config``, listing only the module names ``model`` has (shared
    experts exist only where configured)."""
    names = [name for name, _ in model.named_modules()]
    modules = [m for t in config.targets for m in LORA_TARGETS[t].get("modules", [])
               if any(name == m or name.endswith("." + m) for name in names)]
    parameters = [p for t in config.targets for p in LORA_TARGETS[t].get("parameters", [])]
    return _peft().LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=modules,
        target_parameters=parameters or None,
    )


def attach_lora(model: nn.Module, config: LoRAConfig):
    """``model`` wrapped in a ``PeftModel``: adapters on the targets (their update 0 at first, so
    the wrapped model computes what ``model`` did), every other parameter frozen."""
    return _peft().get_peft_model(model, peft_config(config, model))


def merge_lora(adapter_dir: str, output_dir: str, device: str = "cpu") -> str:
    """The base model named by the adapter in ``adapter_dir`` with the adapter folded in, saved to
    ``output_dir`` (with the processor) as a plain vlmoe folder."""
    from .model.modeling import VLMoEForConditionalGeneration
    from .processing import VLMoEProcessor

    peft = _peft()
    adapter = peft.PeftConfig.from_pretrained(adapter_dir)
    base = VLMoEForConditionalGeneration.from_pretrained(adapter.base_model_name_or_path).to(device)
    merged = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    VLMoEProcessor.from_pretrained(adapter_dir).save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="fold an adapter into its base model")
    merge.add_argument("adapter", help="an adapter folder (runs/NAME/final of a LoRA run)")
    merge.add_argument("output", help="where the merged model goes")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        parser.error(f"{args.adapter}: no adapter_config.json (not a LoRA run's adapter folder)")
    print(merge_lora(args.adapter, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
