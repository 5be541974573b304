"""Checkpoints that survive a kill: written aside, then renamed into place.

Notable choices:
- ``accelerator.save_state`` (model, optimizer, scheduler, RNG states) writes into
  ``checkpoints/.partial-step_N``, the trainer's own state (step, data position) is added, and
  only then is the folder renamed to ``checkpoints/step_N`` (an atomic rename on POSIX). A kill
  at any moment leaves either the previous complete checkpoint or the new one, never a
  half-written ``step_N``; leftovers named ``.partial-*`` are ignored and cleared.
- The last ``keep`` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from accelerate import Accelerator

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def complete_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, TRAINER_STATE)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str) -> str | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: str) -> int:
    """The training step a complete checkpoint was saved at."""
    with open(os.path.join(path, TRAINER_STATE)) as f:
        return json.load(f)["step"]


def save_checkpoint(accelerator: Accelerator, run_dir: str, step: int, trainer_state: dict, keep: int) -> str:
    """Save atomically; every process calls it (Accelerate writes from the main process)."""
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"step_{step:08d}")
    partial = os.path.join(root, f".partial-step_{step:08d}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()  # every process has written its RNG state before the folder is complete
    if accelerator.is_main_process:
        with open(os.path.join(partial, TRAINER_STATE), "w") as f:
            json.dump(trainer_state, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(root):
            if name.startswith(".partial-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str) -> dict:
    """Restore the Accelerate state; returns the trainer's own state."""
    accelerator.load_state(path)
    with open(os.path.join(path, TRAINER_STATE)) as f:
        return json.load(f)
