"""Train a vision-language MoE model.

    python train.py --config configs/tiny.yaml                        # the CPU demo setup
    python train.py --config configs/tiny.yaml train.steps=200 model.moe.top_k=1
    python train.py --config configs/tiny.yaml --resume auto          # continue a killed run
    python train.py --config configs/tiny.yaml train.overwrite=true   # start runs/tiny afresh
    python train.py --config configs/tiny-upcycle.yaml model.init_from=runs/tiny-dense/final  # upcycle a run
    torchrun --nproc_per_node 2 train.py --config configs/tiny.yaml   # 2 processes (CPU: gloo)
    accelerate launch --multi_gpu --num_processes 2 train.py --config configs/tiny.yaml  # the same
    accelerate launch --config_file configs/accelerate/fsdp.yaml train.py --config configs/base.yaml

``accelerate launch --cpu --num_processes 2`` starts one process (Accelerate needs MPI for that):
train.py refuses it and names the commands above.

Overrides are ``dotted.key=value`` paths into the config (see ``vlmoe/training/config.py``).
Writes ``runs/NAME/``: ``config.yaml``, ``checkpoints/``, ``metrics.jsonl``, TensorBoard logs,
and ``final/`` (``save_pretrained`` form: config, weights, tokenizer). A folder that is not empty
is refused unless ``--resume`` continues its run or ``train.overwrite=true`` empties it.
"""

from __future__ import annotations

import argparse
import logging

from vlmoe.training import load_config, train


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML file from configs/ (or your own)")
    parser.add_argument("--resume", help="'auto' (the latest complete checkpoint of the run; an error when there is none) or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    return train(config, resume=args.resume)


if __name__ == "__main__":
    main()
