"""FSDP2 on CPU: ``torchrun --nproc_per_node=2 tests/fsdp_worker.py OUT_DIR`` (gloo).

Shards a tiny version of ``configs/tiny.yaml`` (MoE layers shared across towers) into the units
``configs/accelerate/fsdp.yaml`` names, innermost first as Accelerate's transformer-based policy
does, and holds it to the unsharded model: the loss, the gradients averaged over the ranks'
different batches, one AdamW step, and the gathered full state dict, which rank 0 saves with
``save_pretrained`` and loads back. Raises on any mismatch. Accelerate selects FSDP only on
accelerator devices, so this drives torch's ``fully_shard`` directly.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from PIL import Image
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vlmoe import VLMoEForConditionalGeneration, build_model, train_tokenizer  # noqa: E402
from vlmoe.training import load_config  # noqa: E402

SMALL = [
    "model.vision.img_size=32", "model.vision.embed_dim=32", "model.vision.depth=2", "model.vision.num_heads=2",
    "model.vision.mlp_ratio=2.0", "model.decoder.text_config.hidden_size=32",
    "model.decoder.text_config.intermediate_size=64", "model.decoder.text_config.num_hidden_layers=2",
    "model.decoder.text_config.num_attention_heads=2", "model.decoder.text_config.num_key_value_heads=2",
    "model.moe.num_experts=4",
]
TEXTS = ["a large red circle left of a small blue square", "what color is the circle? red", "how many? 2 yes no"]
COLORS = [(220, 30, 30), (30, 70, 220), (30, 160, 60), (235, 200, 20)]


def wrap_classes() -> set[str]:
    config = OmegaConf.load(os.path.join(ROOT, "configs/accelerate/fsdp.yaml"))
    return set(config.fsdp_config.fsdp_transformer_layer_cls_to_wrap.split(","))


def shard(model: torch.nn.Module, classes: set[str]) -> int:
    """FSDP2 units: each module of a named class (innermost first), then the root. Returns the count."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    units = [m for m in reversed(list(model.modules())) if type(m).__name__ in classes]
    for module in units:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(units)


def batch_of(processor, rank: int) -> dict:
    images = [Image.new("RGB", (32, 32), COLORS[(rank * 2 + i) % 4]) for i in range(2)]
    prompts = [processor.prompt(), processor.prompt("what color is it?")]
    return processor.training_batch(images, prompts, [TEXTS[rank], ["red", "blue"][rank]])


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{what}: {m}")


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = load_config(os.path.join(ROOT, "configs/tiny.yaml"), SMALL)
    torch.manual_seed(0)
    model, processor = build_model(config.model.to_vlmoe_config(), train_tokenizer(TEXTS * 10, vocab_size=300))
    assert model.config.share_moe_layers
    reference = copy.deepcopy(model).train()
    # BatchNorm running statistics (the ViT's conv stem) are each rank's own under FSDP, as under
    # any data-parallel wrapper: rank 0 saves the ones its batch gave.
    rank0 = copy.deepcopy(model).train()
    with torch.no_grad():
        rank0(**batch_of(processor, 0))
    running = {f"{name}.{b}": buf for name, m in rank0.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               for b, buf in m.named_buffers(recurse=False)}
    assert running
    assert shard(model.train(), wrap_classes()) > 0

    # The sharded model on this rank's batch; the reference on every rank's batch, averaged.
    loss = model(**batch_of(processor, rank)).loss
    loss.backward()
    ref_losses = []
    for r in range(world):
        ref_losses.append(reference(**batch_of(processor, r)).loss)
        (ref_losses[-1] / world).backward()
    close(loss.detach(), ref_losses[rank].detach(), "loss")
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        close(p.grad.full_tensor(), q.grad, f"gradient of {name}")

    for m in (model, reference):
        torch.optim.AdamW(m.parameters(), lr=1e-2).step()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    reference.load_state_dict({**reference.state_dict(), **running})
    expected = reference.state_dict()
    if rank == 0:
        assert full.keys() == expected.keys(), set(full) ^ set(expected)
        for name, value in expected.items():
            close(full[name], value, f"{name} after a step")
        model.save_pretrained(out_dir, state_dict=full)
        loaded = VLMoEForConditionalGeneration.from_pretrained(out_dir).eval()
        batch = batch_of(processor, 0)
        with torch.no_grad():
            close(loaded(**batch).logits, reference.eval()(**batch).logits, "logits of the saved model")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
