"""The face: fastdrag.edit() and fastdrag.Editor."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from PIL import Image

from . import kernels as fast_ops
from .compile import merged_lora
from .config import BaseConfig, make_config
from .errors import ConfigError
from .kernels import reference as reference_ops
from .methods import METHODS, _load_all
from .model import DTYPES, DragModel, load_model
from .pipeline import DragContext, Prepared, Progress, Reporter, decode, make_request, prepare
from .unet import UNetFeatures

DEFAULT_MODEL = "runwayml/stable-diffusion-v1-5"


@dataclass
class EditResult:
    image: Image.Image  # same size as the input
    points: list[tuple[float, float]]  # final handle positions, image pixels (x, y)
    timings: dict[str, float]  # seconds per stage: lora, invert, drag, denoise, decode, total
    method: str
    config: BaseConfig
    trace: dict = field(default_factory=dict)  # per-step records: ms_loss, handles, steps, ...


def resolve_backend(cfg: BaseConfig, model: DragModel) -> str:
    if cfg.backend == "auto":
        return "fast" if model.device.type == "cuda" else "reference"
    return cfg.backend


class Execution(NamedTuple):
    """How an edit runs. Each fast-path layer is its own switch so that its gain can be measured."""

    backend: str  # "fast" (Triton ops, lazy upsample) | "reference"
    dtype: torch.dtype
    compile_unet: bool
    cuda_graph: bool  # capture the drag iteration (dragdiffusion, dragtext, clipdrag)
    cuda_graph_stages: bool  # replay the LoRA fit's steps and the inversion and denoising passes from CUDA graphs
    merge_lora: bool


def resolve_execution(cfg: BaseConfig, model: DragModel) -> Execution:
    """Resolve the config's "auto" switches for this model's device: every fast layer is on with backend="fast" on
    CUDA and off otherwise. Asking for a CUDA graph off CUDA is an error, not a silent fallback."""
    backend = resolve_backend(cfg, model)
    cuda = model.device.type == "cuda"
    fast_gpu = backend == "fast" and cuda
    for name in ("cuda_graph", "cuda_graph_stages"):
        if getattr(cfg, name) == "on" and not cuda:
            raise ConfigError(f"{name}='on' needs a model on a CUDA device; this one is on {model.device}")

    def switch(value: str) -> bool:
        return value == "on" or (value == "auto" and fast_gpu)

    dtype = DTYPES[cfg.precision] if cfg.precision != "auto" else (torch.bfloat16 if fast_gpu else model.load_dtype)
    return Execution(backend, dtype, switch(cfg.compile_unet), switch(cfg.cuda_graph),
                     switch(cfg.cuda_graph_stages), switch(cfg.merge_lora))


class Editor:
    """Keeps per-image preparation (LoRA weights, inverted latent, reference features) so that dragging the
    same image again skips it. The cache key covers everything that changes the prepared state: the image
    pixels, prompt, seed, LoRA settings, schedule and inversion strength, and the backend."""

    def __init__(self, model: DragModel, *, max_cached: int = 4):
        _check_model(model)
        if isinstance(max_cached, bool) or not isinstance(max_cached, int) or max_cached < 1:
            raise ConfigError(f"max_cached must be a positive integer, got {max_cached!r}")
        self.model = model
        self.max_cached = max_cached
        self._prepared: OrderedDict = OrderedDict()
        self._loras: OrderedDict = OrderedDict()
        self._compiled: dict[int, torch.nn.Module] = {}  # feature_idx -> compiled UNet pass, kept across edits

    def clear(self) -> None:
        self._prepared.clear()
        self._loras.clear()

    def _unet_pass(self, feature_idx: int) -> torch.nn.Module:
        if feature_idx not in self._compiled:
            from .compile import compile_unet_features  # looked up per call: the tests swap the compile backend

            self._compiled[feature_idx] = compile_unet_features(UNetFeatures(self.model.unet, feature_idx))
        return self._compiled[feature_idx]

    def _key(self, req, cfg: BaseConfig, seed: int, ex: Execution) -> tuple:
        """The prepared image's key. The merge switch is part of it because the reference features cached in the
        prepared state come from the UNet as the drag loop runs it (merged or not: equal up to rounding)."""
        return (req.image_digest(), req.prompt, seed, cfg.lora_steps, cfg.lora_lr, cfg.lora_batch_size,
                cfg.lora_rank, cfg.n_inference_step, cfg.inversion_strength, ex.backend, ex.merge_lora,
                str(self.model.dtype))

    def _prepare(self, req, cfg, seed, ex, reporter) -> Prepared:
        key = self._key(req, cfg, seed, ex)
        if key in self._prepared:
            self._prepared.move_to_end(key)
            prep = self._prepared[key]
            from .lora import set_lora

            set_lora(self.model.unet, prep.lora)
            return prep
        prep = prepare(self.model, req, cfg, seed, reporter, lora_cache=self._loras, graphs=ex.cuda_graph_stages)
        self._prepared[key] = prep
        for cache in (self._prepared, self._loras):
            while len(cache) > self.max_cached:
                cache.popitem(last=False)
        return prep

    def edit(self, image, points, *, mask=None, prompt: str = "", method: str = "dragdiffusion", seed: int = 42,
             progress: Callable[[Progress], None] | None = None, preset: str | None = None,
             **overrides) -> EditResult:
        """Drag `points` = [((hx, hy), (tx, ty)), ...] (image pixels) in `image`. See fastdrag.edit.

        `progress` may raise fastdrag.Cancelled to stop the edit; any exception out of an edit (a cancel, an error)
        leaves the model (LoRA adapter and weights, merged weights, dtype) and this Editor's caches as they were
        before the call."""
        saved = self._save_state()
        try:
            return self._run(image, points, mask=mask, prompt=prompt, method=method, seed=seed, progress=progress,
                             preset=preset, **overrides)
        except BaseException:
            self._restore_state(saved)
            raise

    def _save_state(self) -> tuple:
        from .lora import get_lora

        return (get_lora(self.model.unet), _adapters_enabled(self.model.unet), self.model.dtype,
                OrderedDict(self._prepared), OrderedDict(self._loras), dict(self._compiled))

    def _restore_state(self, saved: tuple) -> None:
        from .lora import remove_adapter, set_lora

        weights, enabled, dtype, prepared, loras, compiled = saved
        unet = self.model.unet
        if weights is None:
            remove_adapter(unet)  # the interrupted call added it
        else:
            set_lora(unet, weights)
            if not enabled:
                unet.disable_adapters()
        if self.model.dtype != dtype:
            self.model.to(dtype=dtype)
        self._prepared, self._loras, self._compiled = prepared, loras, compiled

    def _run(self, image, points, *, mask, prompt, method, seed, progress, preset, **overrides) -> EditResult:
        _load_all()
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
        cfg = make_config(method, preset=preset, **overrides)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ConfigError(f"seed must be an int in [0, 2**63), got {seed!r}")
        req = make_request(image, points, mask, prompt, latent_scale=self.model.vae_scale)
        req.check_drags(cfg.stop_distance)
        ex = resolve_execution(cfg, self.model)
        if self.model.dtype != ex.dtype:
            self.model.to(dtype=ex.dtype)
        reporter = Reporter(progress, self.model.device, to_image=req.to_image_points)
        t0 = time.perf_counter()
        prep = self._prepare(req, cfg, seed, ex, reporter)
        uf = self._unet_pass(cfg.unet_feature_idx) if ex.compile_unet else UNetFeatures(self.model.unet,
                                                                                       cfg.unet_feature_idx)
        ctx = DragContext(model=self.model, cfg=cfg, req=req, prep=prep,
                          ops=fast_ops if ex.backend == "fast" else reference_ops,
                          lazy_upsample=ex.backend == "fast", reporter=reporter, unet_features=uf,
                          cuda_graph=ex.cuda_graph, graph_stages=ex.cuda_graph_stages)
        try:
            with merged_lora(self.model.unet, ex.merge_lora):  # the drag and the denoising; inversion is cached
                out = METHODS[method](ctx)
        finally:
            if not ex.compile_unet:
                uf.close()
        with reporter.stage("decode"):
            img = decode(self.model, out.latent, req.size)
        timings = {k: reporter.timings.get(k, 0.0) for k in ("lora", "invert", "drag", "denoise", "decode")}
        timings["total"] = time.perf_counter() - t0
        return EditResult(image=img, points=req.to_image_points(out.handles), timings=timings, method=method,
                          config=cfg, trace=out.trace)


def _adapters_enabled(unet) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) and not m.disable_adapters for m in unet.modules())


def _check_model(model) -> None:
    if not isinstance(model, DragModel):
        raise ConfigError(f"model must be a DragModel from fastdrag.load_model(...), got {type(model).__name__} "
                          f"{model!r:.60}" + (f"; use model=fastdrag.load_model({model!r})" if isinstance(model, str)
                                              else ""))


_editors: dict[int, Editor] = {}


def edit(image, points, *, mask=None, prompt: str = "", method: str = "dragdiffusion", model: DragModel | None = None,
         seed: int = 42, progress: Callable[[Progress], None] | None = None, **overrides) -> EditResult:
    """Run one drag edit.

    image: PIL.Image | HxWx3 uint8 ndarray | path. points: [((hx, hy), (tx, ty)), ...] in image pixels (x, y).
    mask: HxW bool/uint8 (1 = may change), a PIL image or a path; None = the whole image may change.
    method: "dragdiffusion" | "gooddrag" | "dragtext" | "clipdrag". model: from load_model(); None loads SD-1.5.
    overrides: any field of the method's config (e.g. n_pix_step=40, latent_lr=0.02) and preset="bench"/"ui".
    Repeat calls with the same model reuse the prepared image (LoRA, inversion) where the settings allow.
    """
    if model is None:
        model = load_model(DEFAULT_MODEL)
    _check_model(model)
    editor = _editors.get(id(model))
    if editor is None or editor.model is not model:
        _editors.clear()
        editor = _editors[id(model)] = Editor(model, max_cached=1)
    return editor.edit(image, points, mask=mask, prompt=prompt, method=method, seed=seed, progress=progress,
                       **overrides)


__all__ = ["edit", "Editor", "EditResult", "Execution", "resolve_backend", "resolve_execution"]
