"""What a benchmark record needs to say about the machine, the allocator settings it runs under, and its clock.

glibc reads its ``MALLOC_*`` variables and PyTorch its ``THP_MEM_ALLOC_ENABLE`` once, when the
process starts, so a benchmark that compares allocator settings runs one child process per
setting (``run_per_allocator``) and merges their records; ratios stay side by side within
each child.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

# Environment of each allocator setting. "reuse": large blocks come from the heap, never from a
# fresh mmap, and freed memory is never trimmed back to the OS, so a buffer freed on one call is
# reused, already faulted in, on the next. "thp": PyTorch asks for transparent huge pages for
# its CPU buffers of 2 MB and more (512x fewer page faults); only where the kernel allows THP.
ALLOCATORS = {
    "glibc": {},
    "reuse": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
}
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _cpuinfo_field(name: str) -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.split(":", 1)[0].strip() == name:
            return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what ``platform`` knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_family_model() -> str | None:
    """x86 ``family/model`` (e.g. ``25/1``): what tells apart two CPUs of one model name."""
    family, model = _cpuinfo_field("cpu family"), _cpuinfo_field("model")
    return f"{family}/{model}" if family and model else None


def isa_flags() -> list[str]:
    """The matmul-relevant instruction sets this CPU reports (x86 Linux; empty elsewhere)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [flag for flag in ISA_FLAGS if flag in flags]


def thp_available() -> bool:
    return THP_SETTING.exists() and "[never]" not in THP_SETTING.read_text()


def available_allocators() -> list[str]:
    return [name for name in ALLOCATORS if name != "thp" or thp_available()]


def current_allocator() -> str:
    """The setting this process started under (the first whose variables are all set, else glibc)."""
    for name, env in ALLOCATORS.items():
        if env and all(os.environ.get(k) == v for k, v in env.items()):
            return name
    return "glibc"


def clock(device: torch.device) -> float:
    """Seconds, after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def describe(threads: int) -> dict:
    """The fields every record carries about where it was measured."""
    return {
        "allocator": current_allocator(), "cpu": cpu_model(), "cpu_family_model": cpu_family_model(),
        "cpu_cores": os.cpu_count(), "isa": isa_flags(),
        "torch": torch.__version__, "threads": threads,
    }


def allocator_env(name: str) -> dict[str, str]:
    """This process's environment with exactly one allocator setting's variables."""
    env = {k: v for k, v in os.environ.items() if not any(k in setting for setting in ALLOCATORS.values())}
    return {**env, **ALLOCATORS[name]}


def run_per_allocator(script: str, argv: list[str], allocators: list[str]) -> list[dict]:
    """Run ``script argv`` (which prints a JSON record or a list of them) once per allocator setting;
    the merged records."""
    records = []
    for name in allocators:
        out = subprocess.run([sys.executable, script, *argv], env=allocator_env(name), check=True,
                             stdout=subprocess.PIPE, text=True)
        printed = json.loads(out.stdout)
        records += printed if isinstance(printed, list) else [printed]
    return records
