"""Routing over an evaluation: expert load per layer and modality, and pictures of it.

Notable choices:
- ``RoutingSummary`` accumulates assignment counts (load fraction x positions) per
  (tower, layer, modality), so batches of any size add up exactly; it is a plain object that
  merges across processes by adding.
- Two pictures: the expert-load heatmap (experts x MoE layers) for image and for text positions
  side by side, and, for a few images, each patch coloured by its top-1 expert in every ViT
  MoE layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..model.modeling import RoutingRecord  # noqa: E402

MODALITIES = ("image", "text")


@dataclass
class RoutingSummary:
    """Assignment counts per ``"tower.layer"`` -> modality -> expert, and positions per modality."""

    counts: dict[str, list[list[float]]] = field(default_factory=dict)
    positions: dict[str, list[int]] = field(default_factory=dict)
    entropy_sum: dict[str, list[float]] = field(default_factory=dict)

    def add(self, routing: list[RoutingRecord]) -> None:
        for record in routing:
            out = record.output
            tokens = out.tokens.double()
            self._accumulate(
                f"{record.tower}.{record.layer}", (out.load.double() * tokens[:, None]).tolist(),
                tokens.long().tolist(), (out.entropy.double() * tokens).tolist(),
            )

    def merge(self, other: "RoutingSummary") -> None:
        for name in other.counts:
            self._accumulate(name, other.counts[name], other.positions[name], other.entropy_sum[name])

    def _accumulate(self, name: str, counts: list[list[float]], positions: list[int], entropy: list[float]) -> None:
        if name not in self.counts:
            self.counts[name], self.positions[name], self.entropy_sum[name] = counts, positions, entropy
            return
        self.counts[name] = (np.array(self.counts[name]) + np.array(counts)).tolist()
        self.positions[name] = [a + b for a, b in zip(self.positions[name], positions)]
        self.entropy_sum[name] = [a + b for a, b in zip(self.entropy_sum[name], entropy)]

    def layers(self) -> list[str]:
        return sorted(self.counts, key=lambda n: (n.split(".")[0] != "vision", int(n.split(".")[1])))

    def load(self, name: str, modality: int) -> np.ndarray:
        counts = np.array(self.counts[name][modality])
        return counts / max(counts.sum(), 1e-12)

    def to_json(self) -> dict:
        """Per layer and modality: positions, load fraction per expert, mean entropy, and the
        coefficient of variation of the load (0 = perfectly balanced)."""
        out = {}
        for name in self.layers():
            out[name] = {}
            for m, positions in enumerate(self.positions[name]):
                if positions == 0:
                    continue
                load = self.load(name, m)
                out[name][MODALITIES[m] if m < len(MODALITIES) else str(m)] = {
                    "positions": positions,
                    "load": [round(float(x), 6) for x in load],
                    "load_cv": round(float(load.std() / max(load.mean(), 1e-12)), 6),
                    "entropy": round(self.entropy_sum[name][m] / positions, 6),
                }
        return out

    def save_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)


def plot_load_heatmap(summary: RoutingSummary, path: str) -> None:
    """Experts x MoE layers, one panel per modality, colour = fraction of that layer's assignments."""
    layers = summary.layers()
    fig, axes = plt.subplots(1, len(MODALITIES), figsize=(4 + 0.6 * len(layers) * len(MODALITIES), 4.5), squeeze=False)
    for m, (ax, modality) in enumerate(zip(axes[0], MODALITIES)):
        present = [n for n in layers if summary.positions[n][m] > 0]
        if not present:
            ax.set_title(f"{modality} positions: none")
            ax.axis("off")
            continue
        grid = np.stack([summary.load(n, m) for n in present], axis=1)  # (E, layers)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_xticks(range(len(present)), present, rotation=45, ha="right")
        ax.set_yticks(range(grid.shape[0]))
        ax.set_ylabel("expert")
        ax.set_title(f"expert load, {modality} positions")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def patch_experts(routing: list[RoutingRecord], num_images: int, num_prefix: int, grid: tuple[int, int]) -> list[np.ndarray]:
    """Top-1 expert of every patch of the first ``num_images`` images in each ViT MoE call: ``(L, n, H, W)``."""
    maps = []
    for record in routing:
        if record.tower != "vision":
            continue
        logits = record.output.router_logits  # (B * (prefix + P), E)
        per_image = logits.view(-1, num_prefix + grid[0] * grid[1], logits.shape[-1])[:num_images, num_prefix:]
        maps.append(per_image.argmax(-1).view(-1, *grid).cpu().numpy())
    return maps


def plot_patch_experts(images: list[np.ndarray], maps: list[np.ndarray], num_experts: int, path: str) -> None:
    """Rows: images; columns: the image, then its patches coloured by top-1 expert per ViT MoE layer."""
    rows, cols = len(images), 1 + len(maps)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10" if num_experts <= 10 else "tab20", num_experts)
    for r, image in enumerate(images):
        axes[r][0].imshow(image)
        axes[r][0].set_title("image" if r == 0 else "")
        for c, layer_map in enumerate(maps, start=1):
            axes[r][c].imshow(image)
            axes[r][c].imshow(layer_map[r], cmap=cmap, vmin=-0.5, vmax=num_experts - 0.5, alpha=0.6,
                              extent=(0, image.shape[1], image.shape[0], 0), interpolation="nearest")
            if r == 0:
                axes[r][c].set_title(f"ViT MoE {c - 1}")
    for ax in axes.flat:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(e)) for e in range(num_experts)]
    fig.legend(handles, [f"expert {e}" for e in range(num_experts)], loc="lower center",
               ncol=min(num_experts, 8), fontsize=7)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(num_experts / 8), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def denormalize(pixel_values: torch.Tensor, mean: list[float], std: list[float]) -> list[np.ndarray]:
    """Model inputs back to displayable ``(H, W, 3)`` arrays in [0, 1]."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    images = (pixel_values.float().cpu() * std_t + mean_t).clamp(0, 1)
    return [image.permute(1, 2, 0).numpy() for image in images]
