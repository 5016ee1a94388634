"""The stages every method is composed of: request validation, preparation (LoRA, VAE encode, DDIM
inversion), the pieces of the drag objective, denoising of the [reference, edited] pair, decoding."""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from . import lora as lora_mod
from .attention import mutual_attention
from .compile import GraphedCall, graph_warmup
from .config import BaseConfig
from .ddim import Schedule
from .errors import ConfigError, InvalidInputError
from .inputs import is_number, points_list, warn_user
from .unet import UNetFeatures

MIN_SIDE = 64
LARGE_IMAGE_FACTOR = 2  # warn when an image has more than this many times the model's native pixels


# ----------------------------------------------------------------------------------------------------------
# Progress and timing


@dataclass(frozen=True)
class Progress:
    stage: str  # "lora" | "invert" | "reference" (GoodDrag's unedited trajectory) | "drag" | "denoise"
    step: int
    total: int
    _handles: Callable[[], list[tuple[float, float]]] | None = field(default=None, repr=False, compare=False)

    @property
    def handles(self) -> list[tuple[float, float]] | None:
        """The handles' current positions, image pixels (x, y), during the drag (None in the other stages).
        Computed when read: a callback that never reads it costs the drag loop no host sync."""
        return None if self._handles is None else self._handles()


class Reporter:
    """Forwards stage progress to a user callback (front ends) and collects per-stage wall time."""

    def __init__(self, callback: Callable[[Progress], None] | None, device: torch.device,
                 to_image: Callable[[torch.Tensor], list[tuple[float, float]]] | None = None):
        self.callback = callback
        self.device = device
        self.to_image = to_image  # supervision-grid (row, col) handles -> image (x, y), for Progress.handles
        self.timings: dict[str, float] = {}

    def __call__(self, stage: str, step: int, total: int, handles: torch.Tensor | None = None) -> None:
        if self.callback is None:
            return
        lazy = None
        if handles is not None and self.to_image is not None:
            snap = handles.detach().clone()  # the loop updates its handles in place; a device copy, no sync
            lazy = lambda: self.to_image(snap)  # noqa: E731
        self.callback(Progress(stage, step, total, lazy))

    @contextlib.contextmanager
    def stage(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------------------------------------------------
# Request: validated inputs and their coordinates on the feature grid


def sup_grid_size(H: int, W: int) -> tuple[int, int]:
    """Half-resolution supervision grid (int(H/2), int(W/2)), as official."""
    return int(0.5 * H), int(0.5 * W)


def to_sup_grid(yx: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Image (row, col) [..., 2] -> supervision-grid (row, col): round(y/H*sh), torch.round, as official."""
    sh, sw = sup_grid_size(H, W)
    return torch.round(yx / torch.tensor([H, W]) * torch.tensor([sh, sw], dtype=torch.float32))


@dataclass
class Request:
    image: Image.Image  # RGB
    points: list[tuple[tuple[float, float], tuple[float, float]]]  # ((hx, hy), (tx, ty)) image pixels
    mask: np.ndarray | None  # HxW bool, True = may change
    prompt: str
    resized_from: tuple[int, int] | None = None  # (W, H) of the input image when resize_width resized it

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)"""
        return self.image.height, self.image.width

    @property
    def sup_size(self) -> tuple[int, int]:
        """Half-resolution supervision grid (int(H/2), int(W/2)), as official."""
        return sup_grid_size(*self.size)

    def image_digest(self) -> str:
        h = hashlib.sha1(self.image.tobytes())
        h.update(repr(self.image.size).encode())
        return h.hexdigest()

    def feature_points(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(handles, targets) [N, 2] (row, col) on the supervision grid: round(y/H*sup_h), torch.round."""
        pts = torch.tensor([[p[1], p[0]] for pair in self.points for p in pair], dtype=torch.float32)
        pts = to_sup_grid(pts, *self.size)
        return pts[0::2].to(device), pts[1::2].to(device)

    def to_image_points(self, handles: torch.Tensor) -> list[tuple[float, float]]:
        """Feature-grid (row, col) -> image (x, y)."""
        H, W = self.size
        sh, sw = self.sup_size
        return [(float(c) * W / sw, float(r) * H / sh) for r, c in handles.detach().cpu().tolist()]

    def check_drags(self, stop_distance: float) -> None:
        """Refuse, on the supervision grid, two handles on one point (one handle with two targets) and a pair the
        methods would never move: one whose handle already lies within stop_distance of its target (the official
        loops skip such a pair and count it as reached)."""
        handles, targets = self.feature_points("cpu")
        for j in range(len(handles)):
            for i in range(j):
                if torch.equal(handles[i], handles[j]):
                    raise InvalidInputError(
                        f"handles {i} {self.points[i][0]} and {j} {self.points[j][0]} fall on the same point of the "
                        f"supervision grid (half the image's resolution), so they are one handle with two targets: "
                        f"merge or move them")
        H, W = self.size
        sh, sw = self.sup_size
        for i, d in enumerate((targets - handles).norm(dim=1).tolist()):
            if d < stop_distance:
                raise InvalidInputError(
                    f"pair {i} drags {d:g} supervision-grid px (the methods track points on a {sh}x{sw} grid, half "
                    f"the image's resolution), less than stop_distance={stop_distance:g}: it counts as reached "
                    f"before it starts and would never move. Drag it farther (at least {stop_distance * W / sw:g} "
                    f"image px) or lower stop_distance")

    def latent_mask(self, latent_hw: tuple[int, int], device) -> torch.Tensor | None:
        """1 = editable, at latent resolution: nearest to the supervision grid, then nearest again (official)."""
        if self.mask is None:
            return None
        m = torch.from_numpy(self.mask.astype(np.float32))[None, None]
        m = F.interpolate(m, self.sup_size, mode="nearest")
        m = F.interpolate(m, latent_hw, mode="nearest")
        if m.sum() == 0:
            raise InvalidInputError("the mask's editable region vanishes at latent resolution (1/8 of the image); "
                                    "draw a larger mask")
        return m.to(device)


def load_image(image) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        if os.path.isdir(image):
            raise InvalidInputError(f"image path {image!s} is a directory, not an image file")
        if not os.path.isfile(image):
            raise InvalidInputError(f"image file not found: {image!s}")
        try:  # read in full while the file is open, and closed even when it is truncated or corrupt
            with Image.open(image) as im:
                im.load()
                image = ImageOps.exif_transpose(im)  # a copy, in memory
        except Exception as e:  # noqa: BLE001
            raise InvalidInputError(f"could not read image {image!s}: {e}") from e
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidInputError(f"an array image must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise InvalidInputError(f"image must be a PIL.Image, an HxWx3 uint8 array or a path, got {type(image).__name__}")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        raise InvalidInputError(f"image has mode {image.mode!r} (16-bit, 32-bit or float samples), which has no faithful "
                                f"8-bit RGB conversion here; scale it to 8 bits per channel first")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            raise InvalidInputError(f"image (mode {image.mode!r}) has transparent pixels, whose hidden colours an edit "
                                    f"would use; flatten it onto a background first (e.g. Image.alpha_composite)")
        image = rgba
    try:
        image = image.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise InvalidInputError(f"image cannot be converted to RGB (mode {image.mode!r}): {e}") from e
    if min(image.size) < MIN_SIDE:
        raise InvalidInputError(f"image is {image.width}x{image.height}; both sides must be at least {MIN_SIDE} px")
    return image


def _load_mask(mask, size_hw) -> np.ndarray | None:
    if mask is None:
        return None
    if isinstance(mask, (str, os.PathLike)):
        if os.path.isdir(mask):
            raise InvalidInputError(f"mask path {mask!s} is a directory, not an image file")
        if not os.path.isfile(mask):
            raise InvalidInputError(f"mask file not found: {mask!s}")
        try:
            with Image.open(mask) as m:
                mask = m.convert("L")  # reads it in full while the file is open
        except Exception as e:  # noqa: BLE001
            raise InvalidInputError(f"could not read mask {mask!s}: {e}") from e
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] in (1, 3, 4):
        mask = mask[..., 0]
    if mask.shape != tuple(size_hw):
        raise InvalidInputError(f"mask has shape {mask.shape}; it must be HxW = {tuple(size_hw)}, the image's size")
    if mask.dtype.kind not in "biuf":
        raise InvalidInputError(f"mask must be boolean or numeric, got dtype {mask.dtype}")
    if mask.dtype.kind == "f":
        for bad, name in ((np.isnan(mask), "NaN"), (np.isinf(mask), "inf")):
            if bad.any():
                raise InvalidInputError(f"mask contains {name} ({int(bad.sum())} pixels); a mask is bool, 0/1 or 0/255")
    if mask.dtype.kind != "b":
        negative = mask < 0
        if negative.any():
            every = " (every pixel: an all-negative mask)" if negative.all() else ""
            raise InvalidInputError(f"mask has {int(negative.sum())} negative values{every}, min {mask.min():g}; a "
                                    f"mask is bool, 0/1 or 0/255 with values > 0 editable")
        top = 255 if mask.max() > 1 else 1
        between = (mask != 0) & (mask != top)
        if between.any():
            # the official code binarizes with > 0 (DragDiffusion uint8(mask > 0); GoodDrag mask/255 > 0)
            warn_user(f"mask has {int(between.sum())} pixels with values other than 0 and {top} (from "
                      f"{mask[between].min():g} to {mask[between].max():g}; lossy compression such as JPEG makes "
                      f"them): as in the official code every value > 0 counts as editable, so all of them are. "
                      f"Threshold the mask yourself (e.g. mask > {top / 2:g}) if that is not what you mean")
    mask = mask > 0
    if not mask.any():
        raise InvalidInputError("mask has no editable pixel (all zero); pass mask=None to allow editing everywhere")
    return mask


def _check_point(p, W, H, what, scale=(1.0, 1.0)):
    """An (x, y) point of the input image, scaled by `scale` (resize_width) and then checked against the W x H
    image the methods see."""
    try:
        x, y = p
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be an (x, y) pair of numbers, got {p!r}") from None
    for v in (x, y):
        if not is_number(v):
            kind = "a bool" if isinstance(v, (bool, np.bool_)) else f"a {type(v).__name__}"
            raise InvalidInputError(f"{what} {p!r}: the coordinate {v!r} is {kind}, not a number")
    x, y = float(x), float(y)
    if not (math.isfinite(x) and math.isfinite(y)):
        raise InvalidInputError(f"{what} {p!r} is not finite")
    if scale != (1.0, 1.0):
        what = f"{what} {p!r}, scaled with the image by resize_width to"
        x, y = x * scale[0], y * scale[1]
    if not (0 <= x < W and 0 <= y < H):
        raise InvalidInputError(f"{what} (x={x:g}, y={y:g}) is outside the {W}x{H} image")
    # The last pixel row/column can round to one past the supervision grid's end (Request.feature_points), which
    # the official code indexes out of range. Refuse it rather than clamp it.
    sh, sw = sup_grid_size(H, W)
    row, col = to_sup_grid(torch.tensor([y, x], dtype=torch.float32), H, W)
    for name, v, n, edge in (("row", row, sh, "bottom"), ("column", col, sw, "right")):
        if v >= n:
            raise InvalidInputError(
                f"{what} (x={x:g}, y={y:g}) rounds to {name} {int(v)} of the {sh}x{sw} supervision grid (the methods "
                f"track points at half the image's resolution), past its last {name} {n - 1}: move it off the "
                f"image's {edge} edge")
    return x, y


def resize_input(image: Image.Image, mask: np.ndarray | None, width: int | None, *,
                 native_side: int | None = None) -> tuple[Image.Image, np.ndarray | None, tuple[float, float]]:
    """Resize to `width` as the official UIs do: the image BILINEAR to (width, int(h * width / w)), the mask nearest.
    Returns (image, mask, (sx, sy)), the factors that take the input's (x, y) points to the resized image's; the
    points are scaled and then checked (make_request), never clamped. width=None keeps the size, with a warning if
    the image has more than LARGE_IMAGE_FACTOR times the model's native pixels (native_side ** 2)."""
    w, h = image.size
    if width is None:
        if native_side and w * h > LARGE_IMAGE_FACTOR * native_side ** 2:
            warn_user(
                f"image is {w}x{h} ({w * h / 1e6:.1f} M px), {w * h / native_side ** 2:.0f} times the model's native "
                f"{native_side}x{native_side}: the inversion, every drag step and the denoising cost at least that "
                f"many times more, and SD-1.5 edits best near its native size. Pass resize_width={native_side} (CLI "
                f"--resize-width {native_side}) to resize it as the official UIs do")
        return image, mask, (1.0, 1.0)
    if isinstance(width, bool) or not isinstance(width, numbers.Integral):
        raise ConfigError(f"resize_width must be an integer number of pixels or None, got {width!r}")
    width = int(width)
    height = int(h * width / w)  # truncated, not rounded to a multiple of 8 (official)
    if min(width, height) < MIN_SIDE:
        raise ConfigError(f"resize_width={width} makes the {w}x{h} image {width}x{height}; both sides must be at "
                          f"least {MIN_SIDE} px")
    if (width, height) == (w, h):
        return image, mask, (1.0, 1.0)
    image = image.resize((width, height), Image.BILINEAR)
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))
        if not mask.any():
            raise InvalidInputError(f"the mask's editable region vanishes when the image is resized to {width}x"
                                    f"{height} (resize_width); draw a larger mask or resize less")
    return image, mask, (width / w, height / h)


def make_request(image, points, mask=None, prompt: str = "", *, latent_scale: int = 8,
                 resize_width: int | None = None, native_side: int | None = None) -> Request:
    """Validated inputs. `resize_width` resizes image, mask and points together (resize_input); the request is then
    at the resized size (and so is the edit's result). `native_side`: the model's native image side, for the
    large-image warning."""
    img = load_image(image)
    input_size = img.size
    img, mask, scale = resize_input(img, _load_mask(mask, (img.height, img.width)), resize_width,
                                    native_side=native_side)
    W, H = img.size
    points = points_list([] if points is None else points)
    if not points:
        raise InvalidInputError("no points: pass at least one ((hx, hy), (tx, ty)) handle/target pair")
    pairs = []
    for i, pair in enumerate(points):
        try:
            handle, target = pair
        except (TypeError, ValueError):
            raise InvalidInputError(f"point pair {i} must be ((hx, hy), (tx, ty)), got {pair!r}") from None
        h = _check_point(handle, W, H, f"handle {i}", scale)
        t = _check_point(target, W, H, f"target {i}", scale)
        if h == t:
            raise InvalidInputError(f"handle {i} equals its target {h}: nothing to drag")
        pairs.append((h, t))
    if not isinstance(prompt, str):
        raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
    req = Request(image=img, points=pairs, mask=mask, prompt=prompt,
                  resized_from=input_size if img.size != input_size else None)
    req.latent_mask((H // latent_scale, W // latent_scale), "cpu")  # fail now, not after the LoRA fit
    if req.mask is not None:
        for i, ((hx, hy), _) in enumerate(pairs):
            if not req.mask[int(hy), int(hx)]:
                warn_user(f"handle {i} (x={hx:g}, y={hy:g}) lies outside the editable mask: the mask term holds "
                          f"everything outside the mask in place, so this handle can hardly move. Extend the mask "
                          f"over the handle and its path to the target")
    if H % latent_scale or W % latent_scale:
        warn_user(
            f"image is {W}x{H}, not a multiple of {latent_scale}: the VAE covers only the first "
            f"{W // latent_scale * latent_scale}x{H // latent_scale * latent_scale} px, and the result is that decoded "
            f"and stretched back to {W}x{H}, as in the official code (up to {latent_scale - 1} px of drift at the far "
            f"edges). Crop or resize to a multiple of {latent_scale} to avoid it")
    return req


# ----------------------------------------------------------------------------------------------------------
# Preparation: LoRA, encode, invert (cached per image by the Editor)


@dataclass
class Prepared:
    """Everything about one image that a drag reuses: LoRA, latents, text embedding, the schedule."""

    lora: dict | None
    z0: torch.Tensor  # VAE posterior mean * scaling factor
    zt: torch.Tensor  # DDIM-inverted latent at schedule.t_edit
    text_emb: torch.Tensor  # [1, 77, D] of the source prompt
    schedule: Schedule
    extras: dict = field(default_factory=dict)  # method-specific caches (reference features, trajectories)


def image_tensor(image: Image.Image, device, dtype) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    return (arr / 127.5 - 1).to(device=device, dtype=dtype)


@torch.no_grad()
def encode(model, image: Image.Image) -> torch.Tensor:
    x = image_tensor(image, model.device, model.dtype)
    return model.vae.encode(x).latent_dist.mean * model.scaling_factor


def _unet_eps(model):
    return lambda z, t, c: model.unet(z, t, encoder_hidden_states=c, return_dict=False)[0]


@torch.no_grad()
def invert(model, z0: torch.Tensor, text_emb: torch.Tensor, schedule: Schedule, reporter: Reporter, *,
           graphs: bool = False) -> torch.Tensor:
    """DDIM inversion z0 -> z_{t_edit}. With `graphs`, the UNet pass is replayed from a CUDA graph (the timestep
    then travels as a device tensor; diffusers builds the same int64 tensor from a Python int)."""
    z = z0
    steps = schedule.inversion_timesteps
    fwd = GraphedCall(_unet_eps(model)) if graphs else None
    with graph_warmup(graphs, z.device):
        for i, t in enumerate(steps):
            if fwd is None:
                eps = model.unet(z, t, encoder_hidden_states=text_emb, return_dict=False)[0]
            else:
                eps = fwd("invert", z, torch.full((), t, dtype=torch.long, device=z.device), text_emb)
            z = schedule.inv_step(eps, t, z)
            reporter("invert", i + 1, len(steps))
    return z


@torch.no_grad()
def denoise_pair(model, z_ref, z_edit, c_ref, c_edit, timesteps, *, mutual: bool, start_step: int = 0,
                 start_layer: int = 10, schedule: Schedule, reporter: Reporter | None = None,
                 stage: str = "denoise", graphs: bool = False, progress_from: int = 0,
                 progress_total: int | None = None):
    """Denoise the batch [reference, edited] through `timesteps` (guidance 1). With `mutual`, the edited branch's
    self-attention in blocks >= start_layer reads the reference branch's K/V from step start_step on. With
    `graphs`, the UNet pass is replayed from CUDA graphs, one per attention mode (before / from start_step).
    Progress counts steps progress_from + 1 ... of progress_total (default: these timesteps alone)."""
    z = torch.cat([z_ref, z_edit])
    c = torch.cat([c_ref, c_edit])
    ctx = mutual_attention(model.unet, start_step, start_layer) if mutual else contextlib.nullcontext()
    fwd = GraphedCall(_unet_eps(model)) if graphs else None
    with ctx as control, graph_warmup(graphs, z.device):
        for i, t in enumerate(timesteps):
            if control is not None:
                control.step = i
            if fwd is None:
                eps = model.unet(z, t, encoder_hidden_states=c, return_dict=False)[0]
            else:
                mode = control is not None and control.active()
                eps = fwd(("denoise", mode), z, torch.full((), t, dtype=torch.long, device=z.device), c)
            z = schedule.step(eps, t, z)
            if reporter is not None:
                reporter(stage, progress_from + i + 1, progress_total or len(timesteps))
    return z[:1], z[1:]


@torch.no_grad()
def decode(model, z: torch.Tensor, size_hw: tuple[int, int]) -> Image.Image:
    """VAE decode, clamp to [0, 1], bilinear back to the input size, truncate to uint8 (official)."""
    x = model.vae.decode(z / model.scaling_factor, return_dict=False)[0]
    x = (x.float() / 2 + 0.5).clamp(0, 1)
    if tuple(x.shape[-2:]) != tuple(size_hw):
        x = F.interpolate(x, size_hw, mode="bilinear")
    arr = (x[0].permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
    return Image.fromarray(arr)


def fitted_lora(model, req: Request, cfg: BaseConfig, seed: int, reporter: Reporter, *, lora_cache: dict | None = None,
                autocast_dtype=None, graphs: bool = False, text_emb: torch.Tensor | None = None,
                encoded: dict | None = None) -> dict | None:
    """The LoRA fitted to this image and prompt with these settings (None with lora_steps=0): from lora_cache, or
    fitted (and left active in the UNet) and put there. text_emb: the prompt's embedding, if already computed.
    encoded: a dict that a fit on a native-size image fills with its whole-image VAE encoding (see prepare)."""
    lkey = (req.image_digest(), req.prompt, seed, cfg.lora_steps, cfg.lora_lr, cfg.lora_batch_size, cfg.lora_rank,
            str(model.dtype))  # the fit runs through the base weights in the model's dtype
    if lora_cache is not None and lkey in lora_cache:
        weights = lora_cache[lkey]
    elif cfg.lora_steps > 0:
        with reporter.stage("lora"):
            text_emb = model.encode_prompt(req.prompt) if text_emb is None else text_emb
            weights = lora_mod.fit_lora(model, req.image, text_emb, steps=cfg.lora_steps, lr=cfg.lora_lr,
                                        batch_size=cfg.lora_batch_size, rank=cfg.lora_rank, seed=seed,
                                        autocast_dtype=autocast_dtype, progress=reporter, graphs=graphs,
                                        encoded=encoded)
    else:
        weights = None
    if lora_cache is not None:
        lora_cache[lkey] = weights
    return weights


def prepare(model, req: Request, cfg: BaseConfig, seed: int, reporter: Reporter, *, lora_cache: dict | None = None,
            autocast_dtype=None, graphs: bool = False, loaded_lora: dict | None = None) -> Prepared:
    """LoRA fit (or reuse from lora_cache; or `loaded_lora`, weights read from a file, instead of either), VAE
    encode and DDIM inversion for one image and prompt. An image at the model's native size is encoded once: the
    LoRA fit's one crop is the whole image, and its encoding is reused."""
    text_emb = model.encode_prompt(req.prompt)
    encoded: dict = {}
    if loaded_lora is not None:
        weights = loaded_lora
    else:
        weights = fitted_lora(model, req, cfg, seed, reporter, lora_cache=lora_cache, autocast_dtype=autocast_dtype,
                              graphs=graphs, text_emb=text_emb, encoded=encoded)
    lora_mod.set_lora(model.unet, weights)
    schedule = Schedule.make(model.scheduler, cfg.n_inference_step, cfg.inversion_strength)
    with reporter.stage("invert"):
        z0 = encoded["mean"] * model.scaling_factor if "mean" in encoded else encode(model, req.image)
        zt = invert(model, z0, text_emb, schedule, reporter, graphs=graphs)
    return Prepared(lora=weights, z0=z0, zt=zt, text_emb=text_emb, schedule=schedule)


# ----------------------------------------------------------------------------------------------------------
# The drag objective's pieces, shared by the methods


@dataclass
class DragContext:
    """What a method's run() receives."""

    model: object
    cfg: BaseConfig
    req: Request
    prep: Prepared
    ops: object  # fastdrag.kernels.reference or fastdrag.kernels (same signatures)
    lazy_upsample: bool  # True: ops sample the upsampled map on the fly; False: materialize it (official)
    reporter: Reporter
    unet_features: UNetFeatures = None
    cuda_graph: bool = False  # capture the drag iteration in a CUDA graph (methods whose loop allows it)
    graph_stages: bool = False  # replay the denoising UNet passes from CUDA graphs (the LoRA fit and the inversion
    # take the same switch through prepare())

    def __post_init__(self):
        if self.unet_features is None:
            self.unet_features = UNetFeatures(self.model.unet, self.cfg.unet_feature_idx)

    @property
    def device(self):
        return self.model.device

    def features(self, feat: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """A UNet feature [1, C, h, w] -> (map, out_size) for the ops: either the map and the supervision size
        (the ops evaluate the bilinear upsample only where they read), or the materialized upsampled map."""
        if self.lazy_upsample:
            return feat[0], self.req.sup_size
        return self.ops.upsample(feat[0], self.req.sup_size), None


def motion_step(handles: torch.Tensor, targets: torch.Tensor, stop: float, cap: float | None):
    """Per point: distance to target, active flag (dist >= stop) and the step d (unit, or clipped to cap)."""
    diff = targets - handles
    dist = diff.norm(dim=1)
    active = (dist >= stop).to(handles.dtype)
    unit = diff / dist.clamp_min(1e-8)[:, None]
    step = unit if cap is None else unit * dist.clamp(max=cap)[:, None]
    return dist, active, step


def mask_term(schedule: Schedule, eps: torch.Tensor, t: int, z: torch.Tensor, x_prev0: torch.Tensor,
              mask: torch.Tensor | None, *, always: bool = False) -> torch.Tensor | float:
    """sum |(z_{t-1} - z0_{t-1}) * (1 - M)| over the latent (a sum, not a mean, as official), with z_{t-1} the
    one-step DDIM output of the optimized latent. Zero without a mask ((1 - M) = 0), and then not computed.

    always (quirks="official" for GoodDrag and CLIPDrag): without a mask, the term the released code adds for an
    undrawn mask, i.e. M = 0 and the whole latent held to the unedited one. Official GoodDrag adds the term
    unconditionally (pipeline.py, cal_motion_supervision_loss, L484-508; the DragText port's GoodDrag/pipeline.py
    likewise), and so does CLIPDrag's bench loop (drag_diffusion_update_final @29c1a94, `# if using_mask:`
    commented out above the term, about L650); an undrawn mask reaches them as all zeros."""
    if mask is None:
        if not always:
            return 0.0
        return (schedule.step(eps.float(), t, z) - x_prev0).abs().sum()
    return ((schedule.step(eps.float(), t, z) - x_prev0) * (1 - mask)).abs().sum()


def term_without_mask(cfg: BaseConfig, always: bool) -> bool:
    """Whether a drag loss computes its mask term with no mask (mask_term's `always`: the released code's always-on
    term under quirks="official"), unless lam = 0 leaves it no weight. Then eps and x_prev0 are needed too."""
    return always and cfg.lam != 0


def loss_mask(cfg: BaseConfig, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask a drag loss reads: None where its mask term has weight lam = 0, so that nothing computes the term
    (and the drag's UNet pass, whose eps only the term reads, stops after the feature block)."""
    return None if cfg.lam == 0 else mask


def reached_on_device(handles: torch.Tensor, targets: torch.Tensor, stop: float) -> torch.Tensor:
    """Every handle within `stop` of its target, as a device bool (no host sync)."""
    return ((targets - handles).norm(dim=1) < stop).all()


def reached(handles: torch.Tensor, targets: torch.Tensor, stop: float) -> bool:
    """The host check of a drag loop."""
    return bool(reached_on_device(handles, targets, stop))


def masked_step(opt: torch.optim.Optimizer, leaf: torch.Tensor, grad: torch.Tensor,
                done: torch.Tensor | None = None) -> None:
    """One optimizer step on `leaf` with gradient `grad`; with a device flag `done`, the step is undone on the
    device when it is up (a finished run masks its own updates). The optimizer's moments still move, which is
    harmless: `done` never goes down again, so the leaf never takes another step."""
    prev = leaf.detach().clone() if done is not None else None
    leaf.grad = grad
    opt.step()
    leaf.grad = None
    if prev is not None:
        with torch.no_grad():
            leaf.copy_(torch.where(done, prev, leaf))


class TextLeaf:
    """DragText's optimized text embedding (spec dragtext A), the clean version: c_hat starts at c and has its own
    Adam; its loss is motion supervision + text_lam * sum |c - c_hat| over tokens [0, pad_idx), the regularization
    counted once. The latent loss never reaches c_hat and this loss never reaches the latent."""

    def __init__(self, c: torch.Tensor, cfg: BaseConfig, pad_idx: int, *, capturable: bool = False):
        self.c = c.detach().float()
        self.value = self.c.clone().requires_grad_(True)  # an fp32 leaf whatever the model dtype
        self.opt = torch.optim.Adam([self.value], lr=cfg.text_lr, capturable=capturable)
        self.lam = cfg.text_lam
        self.pad = pad_idx

    def update(self, loss_ms: torch.Tensor, done: torch.Tensor | None = None, *, latent_grad=None, reg_times=1,
               z: torch.Tensor | None = None) -> torch.Tensor | None:
        """One Adam step on c_hat from the motion-supervision term of the forward that used it (one extra backward:
        call after the latent's autograd.grad(..., retain_graph=True)).

        The released code's gradient flows (quirks="official"; docs/deviations.md, DragText): latent_grad, the
        latent loss's gradient on c_hat, is added to c_hat's (its backward accumulates into c_hat.grad);
        reg_times multiplies the regularization (the DragDiffusion port adds it once per active handle); with z,
        the text loss's gradient on z is returned too (the DragDiffusion port's text backward leaves it in
        z.grad for the next iteration)."""
        reg = self.lam * (self.c - self.value)[:, :self.pad].abs().sum()
        if z is None:
            (g,) = torch.autograd.grad(loss_ms + reg_times * reg, self.value)
            g_z = None
        else:
            g, g_z = torch.autograd.grad(loss_ms + reg_times * reg, (self.value, z))
        if latent_grad is not None:
            g = g + latent_grad
        masked_step(self.opt, self.value, g, done)
        return g_z
