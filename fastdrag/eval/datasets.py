"""Benchmark readers: DragBench (DragDiffusion) and Drag100 (GoodDrag), detected from the folder's layout.

DragBench (github.com/Yujun-Shi/DragDiffusion, drag_bench_evaluation/run_drag_diffusion.py and labeling_tool.py):
    <root>/<category>/<sample>/original_image.png
    <root>/<category>/<sample>/meta_data.pkl   {"prompt": str, "points": [(x, y), ...], "mask": HxW uint8 array}
  points alternate handle, target in image pixels (x, y); the mask is 0/1 (the official runner maps every non-zero
  value to 1). The per-sample LoRA of the official `--lora_steps` workflow lives in a separate tree,
  `drag_bench_lora/<category>/<sample>/<lora_steps>`: see `lora_folder`.
Drag100 (github.com/zewei-Zhang/GoodDrag, bench_gooddrag.py and evaluation/compute_DAI.py):
    <root>/<sample>/original.jpg, mask.png (first channel if RGB), points.json {"points": [[x, y], ...]}
  with the same alternation; the prompt is empty, as the official bench script passes it.

`scan` lists the samples (cheap, layout errors raise); `read_sample` loads one and raises DatasetError naming the
sample and the problem; `check_dataset` reads them all and raises on the first bad one.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import InvalidInputError

DRAGBENCH, DRAG100 = "dragbench", "drag100"
SKIP = {".DS_Store", ".ipynb_checkpoints", "__MACOSX"}


class DatasetError(InvalidInputError):
    """A dataset folder, or one sample in it, that cannot be read as a DragBench or Drag100 sample."""


@dataclass(frozen=True)
class SampleRef:
    id: str  # "<category>/<sample>" (DragBench) or "<sample>" (Drag100); also the sample's folder in the run
    category: str | None
    path: str  # the sample's folder
    layout: str


@dataclass
class Sample:
    ref: SampleRef
    image: np.ndarray  # HxWx3 uint8
    mask: np.ndarray | None  # HxW bool, True = may change; None = the whole image
    points: list  # [((hx, hy), (tx, ty)), ...] image pixels
    prompt: str

    @property
    def id(self) -> str:
        return self.ref.id


def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if d not in SKIP and not d.startswith(".")
                  and os.path.isdir(os.path.join(path, d)))


def detect_layout(root: str) -> str:
    """DRAGBENCH or DRAG100 from the files present; an empty, mixed or unknown folder is a DatasetError."""
    if not os.path.isdir(root):
        raise DatasetError(f"dataset folder {root!r} does not exist or is not a folder")
    top = _subdirs(root)
    if not top:
        raise DatasetError(f"dataset folder {root!r} is empty: expected DragBench <category>/<sample>/"
                           f"original_image.png + meta_data.pkl or Drag100 <sample>/original.jpg + mask.png + "
                           f"points.json")
    drag100 = any(os.path.exists(os.path.join(root, d, f)) for d in top for f in ("original.jpg", "points.json"))
    dragbench = any(os.path.exists(os.path.join(root, d, s, f)) for d in top for s in _subdirs(os.path.join(root, d))
                    for f in ("original_image.png", "meta_data.pkl"))
    if drag100 and dragbench:
        raise DatasetError(f"dataset folder {root!r} mixes the Drag100 layout (<sample>/original.jpg) and the "
                           f"DragBench layout (<category>/<sample>/original_image.png); give one of them")
    if not (drag100 or dragbench):
        raise DatasetError(f"dataset folder {root!r} holds neither DragBench <category>/<sample>/original_image.png "
                           f"+ meta_data.pkl nor Drag100 <sample>/original.jpg + mask.png + points.json "
                           f"(first folder: {top[0]!r})")
    return DRAGBENCH if dragbench else DRAG100


def scan(root: str, layout: str | None = None) -> list[SampleRef]:
    """Every sample folder under `root`, sorted by id. A folder that belongs to the layout but lacks files is still
    listed (read_sample reports it), so that no sample is silently dropped."""
    layout = layout or detect_layout(root)
    refs = []
    if layout == DRAGBENCH:
        for cat in _subdirs(root):
            for s in _subdirs(os.path.join(root, cat)):
                refs.append(SampleRef(f"{cat}/{s}", cat, os.path.join(root, cat, s), layout))
    elif layout == DRAG100:
        refs = [SampleRef(s, None, os.path.join(root, s), layout) for s in _subdirs(root)]
    else:
        raise DatasetError(f"unknown dataset layout {layout!r}; expected {DRAGBENCH!r} or {DRAG100!r}")
    if not refs:
        raise DatasetError(f"dataset folder {root!r} ({layout}) holds no sample folders")
    return refs


def _need(ref: SampleRef, name: str) -> str:
    p = os.path.join(ref.path, name)
    if not os.path.isfile(p):
        raise DatasetError(f"sample {ref.id!r}: missing {name} (in {ref.path})")
    return p


def _image(ref: SampleRef, path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except OSError as e:
        raise DatasetError(f"sample {ref.id!r}: {os.path.basename(path)} is not a readable image: {e}") from None


def _pairs(ref: SampleRef, points, where: str) -> list:
    try:
        flat = [(float(p[0]), float(p[1])) for p in points]
        if any(len(p) != 2 for p in points):
            raise ValueError
    except (TypeError, ValueError, IndexError, KeyError):
        raise DatasetError(f"sample {ref.id!r}: {where} points must be a list of [x, y] pairs, got "
                           f"{points!r:.120}") from None
    if not flat:
        raise DatasetError(f"sample {ref.id!r}: {where} has no points")
    if len(flat) % 2:
        raise DatasetError(f"sample {ref.id!r}: {where} has {len(flat)} points; they alternate handle, target, so "
                           f"the count must be even")
    if not all(np.isfinite(v) for p in flat for v in p):
        raise DatasetError(f"sample {ref.id!r}: {where} has a non-finite coordinate: {points!r:.120}")
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _check_points_inside(ref: SampleRef, pairs: list, w: int, h: int) -> None:
    for pair in pairs:
        for x, y in pair:
            if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
                raise DatasetError(f"sample {ref.id!r}: point ({x:g}, {y:g}) lies outside the {w}x{h} image")


def _mask(ref: SampleRef, mask, shape, where: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[:, :, 0]  # as the official readers do with an RGB mask
    if m.ndim != 2 or m.shape != tuple(shape):
        raise DatasetError(f"sample {ref.id!r}: {where} has shape {np.asarray(mask).shape}, the image is "
                           f"{shape[0]}x{shape[1]} (HxW)")
    if not np.issubdtype(m.dtype, np.number) and m.dtype != bool:
        raise DatasetError(f"sample {ref.id!r}: {where} has dtype {m.dtype}, expected numbers")
    return m > 0


def read_sample(ref: SampleRef) -> Sample:
    if ref.layout == DRAGBENCH:
        image = _image(ref, _need(ref, "original_image.png"))
        try:
            with open(_need(ref, "meta_data.pkl"), "rb") as f:
                meta = pickle.load(f)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
            raise DatasetError(f"sample {ref.id!r}: meta_data.pkl is not readable: {e}") from None
        if not isinstance(meta, dict) or not {"prompt", "points", "mask"} <= set(meta):
            raise DatasetError(f"sample {ref.id!r}: meta_data.pkl must be a dict with 'prompt', 'points' and "
                               f"'mask', got {sorted(meta) if isinstance(meta, dict) else type(meta).__name__}")
        prompt = meta["prompt"]
        if not isinstance(prompt, str):
            raise DatasetError(f"sample {ref.id!r}: meta_data.pkl prompt must be a string, got {prompt!r:.60}")
        pairs = _pairs(ref, meta["points"], "meta_data.pkl")
        mask = _mask(ref, meta["mask"], image.shape[:2], "meta_data.pkl mask")
    else:
        image = _image(ref, _need(ref, "original.jpg"))
        with Image.open(_need(ref, "mask.png")) as im:
            mask = _mask(ref, np.array(im), image.shape[:2], "mask.png")
        try:
            with open(_need(ref, "points.json")) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetError(f"sample {ref.id!r}: points.json is not valid JSON: {e}") from None
        if not isinstance(data, dict) or "points" not in data:
            raise DatasetError(f"sample {ref.id!r}: points.json must be {{\"points\": [[x, y], ...]}}")
        pairs = _pairs(ref, data["points"], "points.json")
        prompt = ""
    _check_points_inside(ref, pairs, image.shape[1], image.shape[0])
    return Sample(ref=ref, image=image, mask=mask, points=pairs, prompt=prompt)


def check_dataset(root: str) -> list[Sample]:
    """Read every sample; the first bad one raises DatasetError naming it."""
    return [read_sample(r) for r in scan(root)]


def lora_folder(root: str, ref: SampleRef, lora_steps: int | None = None) -> str:
    """The sample's LoRA folder in a tree laid out as the official DragBench scripts write it:
    `<root>/<category>/<sample>[/<lora_steps>]` (run_lora_training.py / run_drag_diffusion.py). Missing: an error."""
    parts = [root] + ([ref.category] if ref.category else []) + [os.path.basename(ref.path)]
    if lora_steps is not None:
        parts.append(str(lora_steps))
    p = os.path.join(*parts)
    if not os.path.isdir(p):
        raise DatasetError(f"sample {ref.id!r}: no LoRA folder {p!r}")
    return p
