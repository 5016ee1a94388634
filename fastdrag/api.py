"""The face: fastdrag.edit() and fastdrag.Editor."""

from __future__ import annotations

import numbers
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image

from . import kernels as fast_ops
from .compile import merged_lora
from .config import BaseConfig, make_config
from .errors import ConfigError, InvalidInputError
from .inputs import check_prompt_tokens, check_radii, warn_user
from .kernels import reference as reference_ops
from .methods import METHODS, PREFLIGHT, _load_all
from .model import DTYPES, DragModel, load_model
from .lora_io import SIDECAR, LoadedLora, load_lora
from .lora_io import save_lora as write_lora
from .pipeline import (DragContext, Prepared, Progress, Reporter, Request, decode, fitted_lora, load_image,
                       make_request, prepare, resize_input)
from .unet import UNetFeatures

DEFAULT_MODEL = "runwayml/stable-diffusion-v1-5"


@dataclass
class EditResult:
    """The edited image and what the edit did.

    image: the edited image, the input's size (or the resized size with resize_width; see resized_from).
    points: final handle positions in image pixels, (x, y), one per pair.
    timings: seconds per stage: lora, invert, drag, denoise, decode, total.
    trace: per-step records for tests and front ends (ms_loss, steps, ...). trace["handles"] and
        trace["handles_init"] are the handle positions the methods track, as (row, col) on the half-resolution
        supervision grid (int(H/2) x int(W/2)), not image (x, y): image x = col * W / int(W/2), y = row * H / int(H/2)
        (what `points` holds for the final step).
    resized_from: (W, H) of the input image when resize_width resized it, else None; image, points and trace are
        then all at the resized size.
    """

    image: Image.Image
    points: list[tuple[float, float]]
    timings: dict[str, float]
    method: str
    config: BaseConfig
    trace: dict = field(default_factory=dict)
    resized_from: tuple[int, int] | None = None


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
    if cfg.compile_unet == "on" and not cuda:
        # Warned, not refused: the compiled pass is exact and works on the CPU (the tests check it there), but its
        # first compile takes minutes per image size for a 1.3-1.8x gain; asked for explicitly, it should not surprise.
        warn_user(f"compile_unet='on' on {model.device}: torch.compile of the UNet pass takes minutes on a CPU (again "
                  f"for every new image size) and gains 1.3-1.8x at best; 'auto' (off on the CPU) is faster here",
                  RuntimeWarning)

    def switch(value: str) -> bool:
        return value == "on" or (value == "auto" and fast_gpu)

    dtype = DTYPES[cfg.precision] if cfg.precision != "auto" else (torch.bfloat16 if fast_gpu else model.load_dtype)
    return Execution(backend, dtype, switch(cfg.compile_unet), switch(cfg.cuda_graph),
                     switch(cfg.cuda_graph_stages), switch(cfg.merge_lora))


class Editor:
    """Keeps per-image preparation (LoRA weights, inverted latent, reference features) so that dragging the
    same image again skips it. The cache key covers everything that changes the prepared state: the image
    pixels, prompt, seed, LoRA settings, schedule and inversion strength, and the backend.

    Safe to call from several threads (a web front end's workers): the calls on one model, through any of its
    Editors or fastdrag.edit, are serialised on `model.lock`, so each gets what it would get alone. For
    parallelism use one model per GPU."""

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
        with self.model.lock:
            self._prepared.clear()
            self._loras.clear()

    def _unet_pass(self, feature_idx: int) -> torch.nn.Module:
        if feature_idx not in self._compiled:
            from .compile import compile_unet_features  # looked up per call: the tests swap the compile backend

            self._compiled[feature_idx] = compile_unet_features(UNetFeatures(self.model.unet, feature_idx))
        return self._compiled[feature_idx]

    def _key(self, req, cfg: BaseConfig, seed: int, ex: Execution, loaded: LoadedLora | None = None) -> tuple:
        """The prepared image's key. The merge switch is part of it because the reference features cached in the
        prepared state come from the UNet as the drag loop runs it (merged or not: equal up to rounding). The LoRA
        is either fitted (its settings) or read from a file (the sha256 of the file's bytes): the two never meet."""
        lora = ("file", loaded.digest) if loaded is not None else \
            ("fit", seed, cfg.lora_steps, cfg.lora_lr, cfg.lora_batch_size, cfg.lora_rank)
        return (req.image_digest(), req.prompt, lora, cfg.n_inference_step, cfg.inversion_strength, ex.backend,
                ex.merge_lora, str(self.model.dtype))

    def _prepare(self, req, cfg, seed, ex, reporter, loaded: LoadedLora | None = None) -> Prepared:
        key = self._key(req, cfg, seed, ex, loaded)
        if key in self._prepared:
            self._prepared.move_to_end(key)
            prep = self._prepared[key]
            from .lora import set_lora

            set_lora(self.model.unet, prep.lora)
            return prep
        prep = prepare(self.model, req, cfg, seed, reporter, lora_cache=self._loras, graphs=ex.cuda_graph_stages,
                       loaded_lora=loaded.weights if loaded is not None else None)
        self._prepared[key] = prep
        for cache in (self._prepared, self._loras):
            while len(cache) > self.max_cached:
                cache.popitem(last=False)
        return prep

    def edit(self, image, points, *, mask=None, prompt: str = "", method: str = "dragdiffusion", seed: int = 42,
             progress: Callable[[Progress], None] | None = None, preset: str | None = None, lora=None,
             resize_width: int | None = None, **overrides) -> EditResult:
        """Drag `points` = [((hx, hy), (tx, ty)), ...] (image pixels) in `image`. See fastdrag.edit.

        `progress` may raise fastdrag.Cancelled to stop the edit; any exception out of an edit (a cancel, an error)
        leaves the model (LoRA adapter and weights, merged weights, dtype) and this Editor's caches as they were
        before the call."""
        cfg = _make_config(method, preset, overrides)
        seed = _check_seed(seed)
        if progress is not None and not callable(progress):
            raise ConfigError(f"progress must be None or a callable taking a fastdrag.Progress, got {progress!r} "
                              f"({type(progress).__name__})")
        req = make_request(image, points, mask, prompt, latent_scale=self.model.vae_scale, resize_width=resize_width,
                           native_side=self.model.resolution)
        req.check_drags(cfg.stop_distance)
        check_radii(cfg, req.size, req.sup_size)
        check_prompt_tokens(self.model.tokenizer, req.prompt)
        if getattr(cfg, "edit_prompt", ""):
            check_prompt_tokens(self.model.tokenizer, cfg.edit_prompt, "edit_prompt")
        if lora is not None and cfg.lora_steps == 0:
            raise ConfigError(f"lora={lora!r} and lora_steps=0 (no LoRA) contradict each other; drop one")
        with self.model.lock:  # one edit at a time per model: the weights, LoRA and processors are shared state
            saved = self._save_state()
            try:
                return self._edit(req, cfg, method, seed, progress, lora)
            except BaseException:  # a cancel, an error, Ctrl-C: put the model and the caches back
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

    def _edit(self, req, cfg: BaseConfig, method: str, seed: int, progress, lora) -> EditResult:
        t0 = time.perf_counter()
        loaded = _load_lora(lora, self.model, cfg, req) if lora is not None else None
        ex = resolve_execution(cfg, self.model)
        if self.model.dtype != ex.dtype:
            self.model.to(dtype=ex.dtype)
        PREFLIGHT[method](self.model, cfg, req)  # what the method loads (CLIP) fails now, not after the LoRA fit
        reporter = Reporter(progress, self.model.device, to_image=req.to_image_points)
        prep = self._prepare(req, cfg, seed, ex, reporter, loaded)
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
                          config=cfg, trace=out.trace, resized_from=req.resized_from)

    def save_lora(self, folder, image, *, prompt: str = "", method: str = "dragdiffusion", seed: int = 42,
                  progress: Callable[[Progress], None] | None = None, preset: str | None = None,
                  resize_width: int | None = None, **options) -> str:
        """Write the LoRA that an edit of `image` with these settings uses (fitted now, or taken from this Editor's
        cache) to `folder`: pytorch_lora_weights.safetensors in diffusers' layout (what the official train_lora
        writes and StableDiffusionPipeline.load_lora_weights reads) and fastdrag_lora.json (rank, steps, lr, batch
        size, seed, prompt, image digest). `edit(..., lora=folder)` then skips the fit. Returns the weight file's
        path. The fit shares the cache with edit: saving after an edit (or editing after saving) fits once."""
        if "lora" in options:
            raise ConfigError("save_lora fits a LoRA; lora= (a LoRA to load) does not apply")
        cfg = _make_config(method, preset, options)
        seed = _check_seed(seed)
        if cfg.lora_steps == 0:
            raise ConfigError("lora_steps=0 fits no LoRA: nothing to save")
        if not isinstance(prompt, str):
            raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
        if not isinstance(folder, (str, os.PathLike)) or (os.path.exists(folder) and not os.path.isdir(folder)):
            raise ConfigError(f"save_lora needs a folder path (made if missing), got {folder!r}")
        img, _, _ = resize_input(load_image(image), None, resize_width)  # as edit(resize_width=...): the same cache key
        req = Request(image=img, points=[], mask=None, prompt=prompt)
        with self.model.lock:
            ex = resolve_execution(cfg, self.model)
            if self.model.dtype != ex.dtype:
                self.model.to(dtype=ex.dtype)
            reporter = Reporter(progress, self.model.device)
            weights = fitted_lora(self.model, req, cfg, seed, reporter, lora_cache=self._loras,
                                  graphs=ex.cuda_graph_stages)
            while len(self._loras) > self.max_cached:
                self._loras.popitem(last=False)
            info = dict(rank=cfg.lora_rank, steps=cfg.lora_steps, lr=cfg.lora_lr, batch_size=cfg.lora_batch_size,
                        seed=seed, prompt=prompt, image_sha1=req.image_digest(), image_size=list(req.image.size),
                        model=self.model.name, dtype=str(self.model.dtype).removeprefix("torch."))
            return write_lora(folder, weights, info)


def _make_config(method: str, preset, overrides: dict) -> BaseConfig:
    _load_all()
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    return make_config(method, preset=preset, **overrides)


def _check_seed(seed) -> int:
    if (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral)
            or not 0 <= seed < 2 ** 63):
        raise ConfigError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)  # numpy integers too, as the options take them


def _load_lora(folder, model: DragModel, cfg: BaseConfig, req) -> LoadedLora:
    """Read a LoRA folder for this edit: its rank must be the config's lora_rank (say lora_rank=N to read another)."""
    loaded = load_lora(folder, model.unet)
    if loaded.rank != cfg.lora_rank:
        raise ConfigError(f"the LoRA in {loaded.path!r} has rank {loaded.rank}, but lora_rank={cfg.lora_rank}; pass "
                          f"lora_rank={loaded.rank} to use it")
    info = loaded.info or {}
    if info.get("image_sha1") not in (None, req.image_digest()):
        warnings.warn(f"the LoRA in {loaded.path!r} was fitted to another image (its {SIDECAR} names image "
                      f"{info.get('image_sha1', '')[:12]}..., size {info.get('image_size')}); the edit uses it anyway",
                      UserWarning, stacklevel=4)
    return loaded


def _adapters_enabled(unet) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) and not m.disable_adapters for m in unet.modules())


def _check_model(model) -> None:
    if not isinstance(model, DragModel):
        raise ConfigError(f"model must be a DragModel from fastdrag.load_model(...), got {type(model).__name__} "
                          f"{model!r:.60}" + (f"; use model=fastdrag.load_model({model!r})" if isinstance(model, str)
                                              else ""))


def edit(image, points, *, mask=None, prompt: str = "", method: str = "dragdiffusion", model: DragModel | None = None,
         seed: int = 42, progress: Callable[[Progress], None] | None = None, resize_width: int | None = None,
         lora=None, **overrides) -> EditResult:
    """Run one drag edit.

    image: PIL.Image | HxWx3 uint8 ndarray | path. points: [((hx, hy), (tx, ty)), ...] in image pixels (x, y).
    mask: HxW bool/uint8 (1 = may change), a PIL image or a path; None = the whole image may change.
    method: "dragdiffusion" | "gooddrag" | "dragtext" | "clipdrag". model: from load_model(); None loads SD-1.5.
    progress: None or a callable, called with a fastdrag.Progress(stage, step, total) after each step of each stage.
    resize_width: resize image, mask and points to this width first (height int(h * width / w), as the official
    UIs do with 512); the result is then at the resized size (EditResult.resized_from says so). An image with more
    than twice the model's native pixels and no resize_width gets a warning.
    overrides: any field of the method's config (e.g. n_pix_step=40, latent_lr=0.02) and preset="bench"/"ui".
    lora: a LoRA folder (Editor.save_lora's, or the official train_lora's, e.g. DragBench's per-sample LoRAs) to use
    instead of fitting one; its rank must be lora_rank.
    Repeat calls with the same model reuse the prepared image (LoRA, inversion) where the settings allow.
    Calls on one model from several threads are serialised (see Editor); use one model per GPU for parallelism.
    """
    if model is None:
        model = load_model(DEFAULT_MODEL)
    _check_model(model)
    with model.lock:  # the model's default Editor (one prepared image), kept on the model and freed with it
        editor = model._default_editor
        if editor is None:
            editor = model._default_editor = Editor(model, max_cached=1)
    return editor.edit(image, points, mask=mask, prompt=prompt, method=method, seed=seed, progress=progress,
                       resize_width=resize_width, lora=lora, **overrides)


__all__ = ["edit", "Editor", "EditResult", "Execution", "resolve_backend", "resolve_execution"]
