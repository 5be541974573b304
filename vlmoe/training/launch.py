"""How many processes a run has: refuse a launch that asked for several and got one, and say so.

Notable choices:
- ``accelerate launch --cpu --num_processes N`` (also ``--num_processes N`` without ``--multi_gpu``
  on a machine without GPUs, or an ``accelerate config`` of type MULTI_CPU) goes to Accelerate's
  simple launcher, which starts several processes only through MPI (``--mpirun_hostfile``);
  without it, it starts ONE process with no ``WORLD_SIZE``, which trains alone and exits 0. It
  passes no process count to that process, only its traces: ``ACCELERATE_USE_CPU`` (set by the
  simple launcher alone) and ``MASTER_ADDR`` (set when N > 1 or several machines were asked for).
  One process that sees both stops with the commands that do start N CPU processes:
  ``accelerate launch --multi_gpu`` (torchrun underneath; Accelerate picks gloo on CPU) or torchrun.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

from accelerate import Accelerator

logger = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    pass


def check_launch(accelerator: Accelerator, command: list[str] | None = None) -> None:
    """Raise ``LaunchError`` when Accelerate's simple launcher was asked for several processes
    (or machines) and started this one alone; ``command`` (default ``sys.argv``) is the script and
    its arguments, quoted in the commands the message suggests. Log this process's place otherwise."""
    env = os.environ
    if accelerator.num_processes == 1 and "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env:
        script = shlex.join(command if command is not None else sys.argv)
        raise LaunchError(
            "accelerate launch was asked for several processes (it set MASTER_ADDR) but started only this "
            "one: with --cpu, or without --multi_gpu on a machine without GPUs, Accelerate starts several "
            "CPU processes only through MPI (--mpirun_hostfile). Start N processes on this machine with\n"
            f"    accelerate launch --multi_gpu --num_processes N {script}\n"
            f"or  torchrun --nproc_per_node N {script}\n"
            "(both give N gloo processes on CPU). To train in one process, launch with --num_processes 1 "
            "(a MASTER_ADDR exported in your shell reads as a launch of several: unset it)."
        )
    state = accelerator.state
    logger.info("process %d of %d (%s, backend %s, device %s)", accelerator.process_index,
                accelerator.num_processes, state.distributed_type.value, state.backend, accelerator.device)
