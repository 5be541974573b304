"""Shared fixtures: a tiny synthetic shapes set, made once per test session."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The experts' matmul form is otherwise timed per process: forcing one keeps results bitwise
# reproducible across the processes some tests launch (tests of the autotune unset it).
os.environ.setdefault("VLMOE_EXPERT_FORM", "rows_first")


def load_script(name: str):
    """A data_scripts/ module, imported by path (the folder holds standalone scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "data_scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> str:
    """32 px shapes: 96 train, 24 val, 24 test images, in shards of 32."""
    out = str(tmp_path_factory.mktemp("shapes"))
    make_shapes = load_script("make_shapes")
    make_shapes.main(["--output", out, "--num-train", "96", "--num-val", "24", "--num-test", "24",
                      "--image-size", "32", "--shard-size", "32", "--workers", "1"])
    return out
