"""Sparse Mixture-of-Experts layers: router -> experts -> layer."""

from .config import MoEConfig
from .experts import Dispatch, Experts, FeedForward
from .layer import PADDING, MoELayer, MoEOutput, SharedMoE, moe_layers_of, moe_scope
from .router import ExpertChoiceRouter, Router, RouterOutput, TokenChoiceRouter, build_router

__all__ = [
    "PADDING", "Dispatch", "ExpertChoiceRouter", "Experts", "FeedForward", "MoEConfig", "MoELayer", "MoEOutput",
    "Router", "RouterOutput", "SharedMoE", "moe_layers_of", "TokenChoiceRouter", "build_router", "moe_scope",
]
