"""Print pip constraints that pin each dependency of pyproject.toml to its lower bound.

``make test-floor`` installs with them. torch and torchvision keep the lock's build (their
wheels are gigabytes); every other dependency with a ``>=`` bound is pinned to that bound.

    python requirements/floor.py pyproject.toml requirements/lock.txt > floor.txt
"""

from __future__ import annotations

import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LOCKED_BUILDS = {"torch", "torchvision"}


def floor_constraints(pyproject: str, lock: str) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project.get("optional-dependencies", {}).values() for r in extra]
    with open(lock) as f:
        locked = {canonicalize_name(Requirement(line.strip()).name): line.strip() for line in f if "==" in line}
    lines = []
    for req in requirements:
        name = canonicalize_name(req.name)
        if name in LOCKED_BUILDS:
            lines.append(locked[name])
            continue
        lower = [spec.version for spec in req.specifier if spec.operator == ">="]
        if lower:
            lines.append(f"{name}=={lower[0]}")
    return lines


if __name__ == "__main__":
    print("\n".join(floor_constraints(*sys.argv[1:3])))
