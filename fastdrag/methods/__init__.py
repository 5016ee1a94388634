"""Method registry: a method is a function run(ctx: DragContext) -> MethodOutput, registered by name.

A method file says what is different about that method and nothing else; preparation (LoRA, inversion),
decoding and input checks are shared and live in fastdrag.pipeline / fastdrag.api.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

METHODS: dict[str, Callable] = {}
# name -> preflight(model, cfg, req): loads or checks what the method needs beyond the shared stages (CLIPDrag's
# CLIP model) and raises if it cannot. The API calls it before preparation, so that no failure comes after the
# LoRA fit and the inversion; a method without one needs nothing more.
PREFLIGHT: dict[str, Callable] = {}


@dataclass
class MethodOutput:
    latent: torch.Tensor  # the edited branch's final latent z_0 [1, 4, h, w]
    handles: torch.Tensor  # final handle positions on the supervision grid [N, 2] (row, col)
    trace: dict = field(default_factory=dict)  # per-step records for tests and front ends


def _nothing_to_check(model, cfg, req) -> None:
    return None


def register(name: str, *, preflight: Callable | None = None):
    def deco(fn):
        METHODS[name] = fn
        PREFLIGHT[name] = preflight or _nothing_to_check
        return fn

    return deco


def _load_all():
    from . import dragdiffusion, gooddrag  # noqa: F401  (registration side effect)
    from . import clipdrag  # noqa: F401


__all__ = ["METHODS", "PREFLIGHT", "MethodOutput", "register"]
