"""A fitted LoRA on disk: the folder Editor.save_lora writes and the `lora=FOLDER` option of the edits reads.

The folder holds `pytorch_lora_weights.safetensors` in diffusers' LoRA layout (keys `unet.<module>.lora_A.weight` /
`.lora_B.weight` on to_q, to_k, to_v and to_out.0 of every attention module, LoRA scale 1: what
StableDiffusionPipeline.load_lora_weights reads), and `fastdrag_lora.json`, the settings of the fit. Reading also
takes what the official DragDiffusion / GoodDrag `train_lora` wrote through older diffusers, as DragBench's
per-sample LoRA folders hold them: `pytorch_lora_weights.bin` or `.safetensors`, with keys `<module>.lora.down /
.lora.up.weight` (diffusers 0.24) or `<attention>.processor.to_q_lora.down.weight` and so on (attention processors,
diffusers <= 0.23). The sidecar is optional on reading. When both weight files are there the .safetensors one is
read, as diffusers does.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import torch

from .errors import ModelLoadError
from .lora import ADAPTER, TARGETS

WEIGHTS_SAFE = "pytorch_lora_weights.safetensors"
WEIGHTS_BIN = "pytorch_lora_weights.bin"
SIDECAR = "fastdrag_lora.json"
FORMAT = "fastdrag-lora/1"

# a key of one of the three layouts -> (module, "A" | "B")
_PEFT = re.compile(r"^(?P<m>.+)\.lora_(?P<ab>[AB])\.weight$")
_LORA = re.compile(r"^(?P<m>.+)\.lora\.(?P<ud>down|up)\.weight$")
_PROCS = re.compile(r"^(?P<attn>.+)\.processor\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$")


@dataclass(frozen=True)
class LoadedLora:
    path: str  # the weight file read
    digest: str  # sha256 of its bytes: the cache key of everything prepared with it
    weights: dict  # fastdrag.lora's parameter names -> fp32 tensors (set_lora takes it)
    rank: int
    info: dict | None  # the sidecar, when the folder has one


def _module_and_side(key: str) -> tuple[str, str] | None:
    m = _PEFT.match(key)
    if m:
        return m["m"], m["ab"]
    m = _LORA.match(key)
    if m:
        return m["m"], "A" if m["ud"] == "down" else "B"
    m = _PROCS.match(key)
    if m:
        proj = "to_out.0" if m["p"] == "to_out" else m["p"]
        return f"{m['attn']}.{proj}", "A" if m["ud"] == "down" else "B"
    return None


def _targets(unet) -> dict[str, tuple[int, int]]:
    """Every LoRA-adapted projection of the UNet -> (in_features, out_features), with or without peft's wrapper."""
    out = {}
    for name, mod in unet.named_modules():
        if any(name == t or name.endswith("." + t) for t in TARGETS):
            base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
            out[name] = (base.in_features, base.out_features)
    return out


def weight_file(folder) -> str:
    """The weight file a LoRA folder holds; ModelLoadError naming the folder when there is none."""
    if not isinstance(folder, (str, os.PathLike)):
        raise ModelLoadError(f"lora must be the path of a LoRA folder, got {type(folder).__name__} {folder!r:.60}")
    folder = os.fspath(folder)
    if os.path.isfile(folder) and os.path.basename(folder) in (WEIGHTS_SAFE, WEIGHTS_BIN):
        return folder
    if not os.path.isdir(folder):
        raise ModelLoadError(f"LoRA folder {folder!r} does not exist" if not os.path.exists(folder) else
                             f"lora={folder!r} is a file; pass the folder that holds {WEIGHTS_SAFE} or {WEIGHTS_BIN}")
    for name in (WEIGHTS_SAFE, WEIGHTS_BIN):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(f"LoRA folder {folder!r} holds neither {WEIGHTS_SAFE} nor {WEIGHTS_BIN} "
                         f"(it has: {sorted(os.listdir(folder))[:8]})")


def _read_state_dict(path: str, data: bytes) -> dict:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load

            sd = load(data)
        else:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: named, with the reader's words
        raise ModelLoadError(f"could not read LoRA weights {path!r} (truncated or not a LoRA file?): {e}") from e
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"LoRA weights {path!r} are not a state dict of tensors")
    return sd


def load_lora(folder, unet) -> LoadedLora:
    """Read and check a LoRA folder against this UNet: every adapted projection present, nothing else, one rank,
    shapes that fit. Errors are ModelLoadError and name the file."""
    path = weight_file(folder)
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    sd = _read_state_dict(path, data)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        if key.startswith("text_encoder."):
            raise ModelLoadError(f"LoRA weights {path!r} adapt the text encoder ({key!r}); only UNet LoRAs (as the "
                                 f"drag methods fit them) can be loaded")
        ms = _module_and_side(key[len("unet."):] if key.startswith("unet.") else key)
        if ms is None:
            raise ModelLoadError(f"LoRA weights {path!r}: key {key!r} is not a LoRA weight of a UNet attention "
                                 f"projection in any layout read here (see fastdrag.lora_io)")
        pairs.setdefault(ms[0], {})[ms[1]] = t
    targets = _targets(unet)
    missing = sorted(set(targets) - set(pairs))
    extra = sorted(set(pairs) - set(targets))
    if missing or extra:
        raise ModelLoadError(f"LoRA weights {path!r} do not fit this model's UNet: "
                             + (f"{len(missing)} of its {len(targets)} adapted projections have no weights (e.g. "
                                f"{missing[0]!r}) " if missing else "")
                             + (f"{len(extra)} modules it lacks (e.g. {extra[0]!r})" if extra else ""))
    weights, ranks = {}, set()
    for name, (fan_in, fan_out) in targets.items():
        ab = pairs[name]
        if set(ab) != {"A", "B"}:
            raise ModelLoadError(f"LoRA weights {path!r}: {name!r} has only its {'down (A)' if 'A' in ab else 'up (B)'}"
                                 f" matrix")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or a.shape[0] != b.shape[1]:
            raise ModelLoadError(f"LoRA weights {path!r}: {name!r} has down {tuple(a.shape)} and up {tuple(b.shape)}, "
                                 f"which do not fit a {fan_in} -> {fan_out} projection (a LoRA of another model?)")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ModelLoadError(f"LoRA weights {path!r}: {name!r} holds non-finite values")
        ranks.add(a.shape[0])
        weights[f"{name}.lora_A.{ADAPTER}.weight"] = a.to(torch.float32).contiguous()
        weights[f"{name}.lora_B.{ADAPTER}.weight"] = b.to(torch.float32).contiguous()
    if len(ranks) != 1:
        raise ModelLoadError(f"LoRA weights {path!r} mix ranks {sorted(ranks)}; one rank for all projections is read")
    rank = ranks.pop()
    info = _read_sidecar(os.path.dirname(path), path, rank, digest)
    return LoadedLora(path=path, digest=digest, weights=weights, rank=rank, info=info)


def _read_sidecar(folder: str, path: str, rank: int, digest: str) -> dict | None:
    side = os.path.join(folder, SIDECAR)
    if not os.path.exists(side):
        return None
    try:
        with open(side) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"LoRA sidecar {side!r} is not readable JSON: {e}") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ModelLoadError(f"LoRA sidecar {side!r} is not a {FORMAT} description")
    if info.get("weights") == os.path.basename(path) and info.get("sha256") != digest:
        raise ModelLoadError(f"LoRA sidecar {side!r} describes another {info['weights']} than the one in the folder "
                             f"(its sha256 differs): the weights were replaced; remove or rewrite the sidecar")
    if info.get("rank") != rank:
        raise ModelLoadError(f"LoRA sidecar {side!r} says rank {info.get('rank')!r}, but {path!r} has rank {rank}")
    return info


def save_lora(folder, weights: dict, info: dict) -> str:
    """Write `weights` (fastdrag.lora's parameter names) to folder/pytorch_lora_weights.safetensors in diffusers'
    layout, and `info` to the sidecar. Both files are written aside and moved in, so an interrupted save leaves the
    folder as it was. Returns the weight file's path."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tag = f".lora_A.{ADAPTER}.", f".lora_B.{ADAPTER}."
    sd = {n.replace(tag[0], ".lora_A.").replace(tag[1], ".lora_B."): w.detach().to("cpu").contiguous()
          for n, w in weights.items()}
    tmp = tempfile.mkdtemp(prefix=".fastdrag-lora-", dir=folder)
    try:
        StableDiffusionLoraLoaderMixin.save_lora_weights(tmp, unet_lora_layers=sd, weight_name=WEIGHTS_SAFE,
                                                         safe_serialization=True)
        with open(os.path.join(tmp, WEIGHTS_SAFE), "rb") as f:
            info = {"format": FORMAT, **info, "weights": WEIGHTS_SAFE, "sha256": hashlib.sha256(f.read()).hexdigest()}
        with open(os.path.join(tmp, SIDECAR), "w") as f:
            json.dump(info, f, indent=1)
        for name in (WEIGHTS_SAFE, SIDECAR):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(folder, WEIGHTS_SAFE)


__all__ = ["LoadedLora", "SIDECAR", "WEIGHTS_BIN", "WEIGHTS_SAFE", "load_lora", "save_lora", "weight_file"]
