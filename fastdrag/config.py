"""One dataclass per method, with the official defaults (../spec), and named presets.

Field names follow the official code where one exists (lora_steps, latent_lr, n_pix_step, r_m, r_p, lam,
start_step, start_layer, drag_end_step, max_drag_per_track, ...). A method's config is built by
`make_config(method, preset=None, **overrides)`: unknown keys, unknown presets and non-finite or
out-of-range values raise ConfigError.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, fields

import numpy as np

from .errors import ConfigError

BACKENDS = ("auto", "reference", "fast")
FUSION_RULES = ("clipdrag", "projection")  # CLIPDrag gradient fusion (spec dragtext_clipdrag B4)
# "fixed": the released code's result-moving bugs fixed (docs/deviations.md); "official": reproduced, to match
# published numbers (preset "bench" selects it)
QUIRKS = ("fixed", "official")


@dataclass
class BaseConfig:
    """What every method shares: the DragDiffusion backbone (SD-1.5, DDIM 50, guidance 1)."""

    # identity-preserving LoRA (spec dragdiffusion 1.2)
    lora_steps: int = 80
    lora_lr: float = 5e-4
    lora_batch_size: int = 4
    lora_rank: int = 16
    # DDIM schedule and inversion (spec 1.4-1.5)
    n_inference_step: int = 50
    inversion_strength: float = 0.7
    # features: 0 = mid block, 1..4 = up_blocks[0..3] output; 3 = up_blocks[2] (spec 1.6)
    unet_feature_idx: int = 3
    # latent optimization
    latent_lr: float = 0.01
    lam: float = 0.1  # weight of the masked one-step DDIM term
    stop_distance: float = 2.0  # half-resolution feature px; reach / skip threshold
    # mutual self-attention while denoising (spec 1.8)
    start_step: int = 0
    start_layer: int = 10
    # DragText: the text embedding as a second optimized leaf (spec dragtext A)
    optimize_text: bool = False
    text_lr: float = 0.004
    text_lam: float = 0.1
    # execution
    backend: str = "auto"  # "reference" (plain PyTorch, fp32) | "fast" | "auto" (= fast on CUDA)
    check_every: int = 1  # host reads the device stop flag every k drag steps; finished steps are masked
    precision: str = "auto"  # "fp32" | "bf16" | "fp16" | "auto" (bf16 with the fast backend on CUDA, else as loaded)
    compile_unet: str = "auto"  # "on" | "off" | "auto" (on with the fast backend on CUDA)
    cuda_graph: str = "auto"  # "on" | "off" | "auto": capture the drag iteration (on with the fast backend on CUDA)
    cuda_graph_stages: str = "auto"  # "on" | "off" | "auto": LoRA fit, inversion, denoising steps from CUDA graphs
    merge_lora: str = "auto"  # "on" | "off" | "auto": fold the LoRA into the weights after the fit (as cuda_graph)
    # "fixed" | "official": reproduce the released code's result-moving quirks (docs/deviations.md says which)
    quirks: str = "fixed"

    def __post_init__(self):
        self._check_types()
        if self.lora_steps < 0:
            raise ConfigError(f"lora_steps must be an integer >= 0 (0 = no LoRA), got {self.lora_steps!r}")
        positive_ints = ["lora_batch_size", "lora_rank", "n_inference_step", "check_every"]
        for name in positive_ints + [n for n in self._positive_ints() if hasattr(self, n)]:
            v = getattr(self, name)
            if v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ["lora_lr", "latent_lr", "text_lr", "stop_distance"]:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ["lam", "text_lam"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.inversion_strength <= 1:
            raise ConfigError(f"inversion_strength must be in (0, 1], got {self.inversion_strength!r}")
        if round(self.inversion_strength * self.n_inference_step) < 1:
            raise ConfigError("inversion_strength * n_inference_step rounds to 0 steps: nothing to edit")
        if self.unet_feature_idx not in (0, 1, 2, 3, 4):
            raise ConfigError(f"unet_feature_idx must be 0..4 (0 = mid block, k = up_blocks[k-1]), "
                              f"got {self.unet_feature_idx!r}")
        if not 0 <= self.start_layer <= 16:
            raise ConfigError(f"start_layer must be in 0..16, got {self.start_layer!r}")
        if self.start_step < 0:
            raise ConfigError(f"start_step must be >= 0, got {self.start_step!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        for name in ("compile_unet", "cuda_graph", "cuda_graph_stages", "merge_lora"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ConfigError(f"{name} must be 'auto', 'on' or 'off', got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.quirks not in QUIRKS:
            raise ConfigError(f"quirks must be one of {QUIRKS} ('fixed': the released code's bugs fixed; "
                              f"'official': reproduced, as preset 'bench' selects), got {self.quirks!r}")

        self._check_schedule_steps()

    def _check_types(self) -> None:
        """Each field against its annotation (int, float, str or bool). A bool is not a number here and a float is not
        an int; numpy scalars are accepted and stored as Python numbers. Numbers must be finite."""
        for f in fields(self):
            v, kind = getattr(self, f.name), f.type if isinstance(f.type, str) else f.type.__name__
            if kind == "bool":
                ok = isinstance(v, (bool, np.bool_))
                if ok:
                    v = bool(v)
            elif kind == "int":
                ok = isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
                if ok:
                    v = int(v)
            elif kind == "float":
                ok = isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
                if ok:
                    v = float(v)
                    if not math.isfinite(v):
                        raise ConfigError(f"{f.name} must be finite, got {v!r}")
            elif kind == "str":
                ok = isinstance(v, str)
            else:  # pragma: no cover - a field with another annotation would need its own check
                raise TypeError(f"{type(self).__name__}.{f.name}: unchecked annotation {kind!r}")
            if not ok:
                a = {"int": "an integer", "float": "a number", "str": "a string", "bool": "True or False"}[kind]
                raise ConfigError(f"{f.name} must be {a}, got {v!r} ({type(v).__name__})")
            setattr(self, f.name, v)

    def _check_schedule_steps(self) -> None:
        """Step indices against the denoising schedule they index, so that none is silently out of range."""
        if 0 < self._mutual_steps() <= self.start_step:
            raise ConfigError(f"start_step={self.start_step} is past the last of the {self._mutual_steps()} denoising "
                              f"steps with mutual self-attention, so it would never be applied; to turn mutual "
                              f"self-attention off use start_layer=16")
        if self.n_inference_step > 1000:
            raise ConfigError(f"n_inference_step must be at most 1000 (the model's training timesteps), got "
                              f"{self.n_inference_step}")

    def _mutual_steps(self) -> int:
        """How many denoising steps run with mutual self-attention (start_step counts within them)."""
        return self.n_actual_inference_step

    def _positive_ints(self) -> list[str]:
        return []

    # Derived schedule quantities (spec dragdiffusion 1.4/1.5).
    @property
    def n_actual_inference_step(self) -> int:
        return round(self.inversion_strength * self.n_inference_step)  # banker's rounding, as official

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


@dataclass
class DragDiffusionConfig(BaseConfig):
    """DragDiffusion (Shi et al., CVPR'24), official UI / DragBench defaults."""

    n_pix_step: int = 80
    r_m: int = 1
    r_p: int = 3

    def _positive_ints(self):
        return ["n_pix_step", "r_m", "r_p"]


@dataclass
class DragTextConfig(DragDiffusionConfig):
    """DragText on DragDiffusion: the text embedding is optimized alongside the latent."""

    optimize_text: bool = True


@dataclass
class GoodDragConfig(BaseConfig):
    """GoodDrag (Zhang et al., ICLR'25): AlDD + IPMS. UI defaults; see presets for the bench script."""

    lora_steps: int = 70
    inversion_strength: float = 0.75
    latent_lr: float = 0.02
    lam: float = 0.2
    drag_end_step: int = 7
    track_per_step: int = 10  # B: drag operations per drag timestep
    max_drag_per_track: int = 3  # J: motion-supervision steps per tracking update
    r1: int = 4
    r2: int = 12
    beta: float = 4.0  # max motion-supervision step, feature px
    max_track_no_change: int = 10

    def _positive_ints(self):
        return ["drag_end_step", "track_per_step", "max_drag_per_track", "r1", "r2", "max_track_no_change"]

    def _mutual_steps(self) -> int:  # AlDD spends the first drag_end_step timesteps dragging, without it
        return self.n_actual_inference_step - self.drag_end_step

    def _check_schedule_steps(self) -> None:
        if self.drag_end_step > self.n_actual_inference_step:
            raise ConfigError(f"drag_end_step={self.drag_end_step} is more than the {self.n_actual_inference_step} "
                              f"denoising timesteps (round(inversion_strength * n_inference_step))")
        super()._check_schedule_steps()

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta!r}")
        if self.cuda_graph == "on":
            raise ConfigError("cuda_graph='on' is not available for gooddrag: its loop decides on the host when to "
                              "track, stop and move to the next timestep (the official no-change counter); use "
                              "cuda_graph='auto' or 'off'")


@dataclass
class CLIPDragConfig(DragDiffusionConfig):
    """CLIPDrag (Jiang et al.): CLIP text gradient fused with the drag gradient, fast point tracking."""

    n_pix_step: int = 800
    edit_prompt: str = ""  # drives CLIP; empty -> the source prompt
    clip_model: str = "openai/clip-vit-base-patch16"
    fuse_cof: float = 0.7
    clip_loss_coef: float = 300.0
    fusion: str = "clipdrag"  # "clipdrag" (code-exact) | "projection"
    beta: float = 4.0  # GoodDrag-style step min(beta, dist)

    def __post_init__(self):
        super().__post_init__()
        if self.fusion not in FUSION_RULES:
            raise ConfigError(f"fusion must be one of {FUSION_RULES}, got {self.fusion!r}")
        if not isinstance(self.edit_prompt, str):
            raise ConfigError(f"edit_prompt must be a string, got {type(self.edit_prompt).__name__}")
        if not isinstance(self.clip_model, str) or not self.clip_model:
            raise ConfigError(f"clip_model must be a hub id, a local folder or 'tiny', got {self.clip_model!r}")
        for name in ["fuse_cof", "clip_loss_coef"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta!r}")


# One line per config field, for `fastdrag edit --help` (which adds the methods that take it and their defaults).
FIELD_HELP: dict[str, str] = {
    "lora_steps": "identity-preserving LoRA fit steps (0 = no LoRA)",
    "lora_lr": "LoRA fit learning rate",
    "lora_batch_size": "LoRA fit batch size",
    "lora_rank": "LoRA rank",
    "n_inference_step": "DDIM steps of the full schedule",
    "inversion_strength": "fraction of the schedule inverted: the edit timestep",
    "unet_feature_idx": "feature block: 0 = mid block, k = up_blocks[k-1]",
    "latent_lr": "Adam learning rate of the optimized latent",
    "lam": "weight of the masked one-step DDIM term (keeps the area outside the mask)",
    "stop_distance": "a handle this close to its target (half-resolution feature px) counts as reached",
    "start_step": "first denoising step with mutual self-attention",
    "start_layer": "first self-attention layer that reads the reference branch (16 = off)",
    "optimize_text": "also optimize the text embedding (DragText)",
    "text_lr": "Adam learning rate of the optimized text embedding",
    "text_lam": "weight of the text embedding's regularization to the source prompt",
    "backend": "reference (plain PyTorch) | fast (Triton ops) | auto (fast on CUDA)",
    "check_every": "read the device stop flag every k drag steps",
    "precision": "fp32 | bf16 | fp16 | auto (bf16 with the fast backend on CUDA, else as loaded)",
    "compile_unet": "torch.compile the UNet pass: on | off | auto (on with the fast backend on CUDA)",
    "cuda_graph": "capture the drag iteration in a CUDA graph: on | off | auto",
    "cuda_graph_stages": "replay LoRA fit, inversion and denoising steps from CUDA graphs: on | off | auto",
    "merge_lora": "fold the LoRA into the weights after the fit: on | off | auto",
    "n_pix_step": "maximum drag (motion-supervision) steps",
    "r_m": "motion-supervision patch radius, feature px",
    "r_p": "point-tracking search radius, feature px",
    "drag_end_step": "denoising timesteps spent dragging (AlDD)",
    "track_per_step": "drag operations per drag timestep (B)",
    "max_drag_per_track": "motion-supervision steps per tracking update (J)",
    "r1": "motion-supervision patch radius, feature px",
    "r2": "point-tracking search radius, feature px",
    "beta": "largest motion-supervision step, feature px: min(beta, distance)",
    "max_track_no_change": "stop after this many trackings that do not move a handle",
    "edit_prompt": "the text CLIP follows (empty = the source prompt)",
    "clip_model": "CLIP: a transformers CLIPModel hub id, a local folder or 'tiny'",
    "fuse_cof": "weight of the CLIP gradient in the fusion",
    "clip_loss_coef": "scale of the CLIP loss",
    "fusion": "gradient fusion rule: clipdrag (the official code) | projection",
    "quirks": "fixed (fastdrag's corrections) | official (the released code's results, quirks included)",
}

# Named presets: where the official UI and benchmark scripts differ. "bench" exists to reproduce the published
# benchmark numbers, so it also reproduces the released code's quirks (quirks="official", docs/deviations.md).
PRESETS: dict[str, dict[str, dict]] = {
    "dragdiffusion": {
        "ui": {},
        "bench": {"quirks": "official"},
    },
    "dragtext": {
        "ui": {},
        "bench": {"quirks": "official"},
    },
    "gooddrag": {
        "ui": {"lam": 0.2, "max_track_no_change": 10},
        "bench": {"lam": 0.1, "max_track_no_change": 5, "quirks": "official"},
    },
    "clipdrag": {
        "ui": {"fuse_cof": 0.7, "r_m": 1, "r_p": 3, "n_pix_step": 800},
        "bench": {"fuse_cof": 0.3, "r_m": 4, "r_p": 12, "n_pix_step": 40, "quirks": "official"},
    },
}

CONFIGS: dict[str, type[BaseConfig]] = {
    "dragdiffusion": DragDiffusionConfig,
    "dragtext": DragTextConfig,
    "gooddrag": GoodDragConfig,
    "clipdrag": CLIPDragConfig,
}


def make_config(method: str, preset: str | None = None, **overrides) -> BaseConfig:
    """Build `method`'s config: defaults, then the named preset, then the overrides."""
    if method not in CONFIGS:
        raise ConfigError(f"unknown method {method!r}; expected one of {sorted(CONFIGS)}")
    cls = CONFIGS[method]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) for method {method!r}: {unknown}; valid options: {sorted(names)}")
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS.get(method, {}):
            raise ConfigError(f"unknown preset {preset!r} for method {method!r}; "
                              f"expected one of {sorted(PRESETS.get(method, {}))}")
        values.update(PRESETS[method][preset])
    values.update(overrides)
    return cls(**values)


__all__ = ["BaseConfig", "DragDiffusionConfig", "DragTextConfig", "GoodDragConfig", "CLIPDragConfig",
           "PRESETS", "QUIRKS", "CONFIGS", "FIELD_HELP", "make_config"]
