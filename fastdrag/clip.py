"""CLIP for CLIPDrag: loading, and the global (text) gradient on the drag latent (spec dragtext_clipdrag B4).

The model is a transformers.CLIPModel: "openai/clip-vit-base-patch16" (the official OpenAI ViT-B/16), any
local CLIPModel folder, or "tiny", a small random CLIPModel built offline for tests. open_clip / the OpenAI
`clip` package are not used: they need torchvision, which has no CPU build matching our torch.

The global gradient of a latent z at the drag timestep t:
    x0 = DDIM x0-prediction of UNet(z, t, c_src)      (a second UNet pass on a detached copy of z)
    x  = clamp(VAE.decode(x0 / scaling) / 2 + 0.5, 0, 1)
    L  = coef * (1 - cos(CLIP_img(normalize(avgpool_224(x))), CLIP_txt(prompt)))
    G_g = dL/dz
The official code maps x to [0, 1] twice before the CLIP mean/std normalization and rounds x0 to fp16 before
decoding; we map once and decode x0 as computed (docs/deviations.md, "CLIPDrag"). An objective built with
official=True reproduces both (config quirks="official").
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import ModelLoadError
from .model import own_aligned_storage

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
# OpenAI CLIP preprocessing constants (also those of the HF openai/clip-* image processors)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 2
_CACHE_LOCK = threading.Lock()  # two models in two threads may ask for the same CLIP at once


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp16/bf16 -> fp32; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def build_tiny_clip(seed: int = 0):
    """A small random CLIPModel (224 px input, 32 px patches) and the fastdrag tiny tokenizer. Deterministic."""
    from transformers import CLIPConfig, CLIPModel

    from .model import _tiny_tokenizer

    tok = _tiny_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=224, patch_size=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return model, tok


def _load_pretrained(name_or_path: str):
    from transformers import CLIPModel, CLIPTokenizer

    if os.path.exists(name_or_path) and not os.path.isdir(name_or_path):
        raise ModelLoadError(f"CLIP model {name_or_path!r} is a file; expected a CLIPModel folder, a hub id "
                             f"or 'tiny'")
    try:
        model = CLIPModel.from_pretrained(name_or_path)
        tok = CLIPTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # noqa: BLE001 - re-raised with the name that failed
        raise ModelLoadError(f"could not load CLIP model {name_or_path!r} (a transformers CLIPModel hub id such as "
                             f"{DEFAULT_CLIP!r}, a local folder with its config, weights and tokenizer, or "
                             f"'tiny'): {e}") from e
    return model, tok


def load_clip(name_or_path: str = DEFAULT_CLIP, device=None, dtype: torch.dtype | None = None):
    """(CLIPModel, tokenizer), frozen and in eval mode, on `device` in `dtype`. Cached per (name, device, dtype)."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ModelLoadError(f"clip_model must be a hub id, a local folder or 'tiny', got {name_or_path!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.float32
    name = name_or_path if name_or_path == "tiny" or not os.path.isdir(name_or_path) \
        else os.path.realpath(name_or_path)
    key = (name, str(device), dtype)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        model, tok = build_tiny_clip() if name_or_path == "tiny" else _load_pretrained(name_or_path)
        model.requires_grad_(False).eval().to(device=device, dtype=dtype)
        own_aligned_storage(model)  # from_pretrained's tensors, if the cast left them where they were loaded
        _CACHE[key] = (model, tok)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return model, tok


def _embeds(out) -> torch.Tensor:
    """get_*_features returns the projected embeddings (transformers 4) or a ModelOutput holding them in
    pooler_output (transformers 5)."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        v = getattr(out, name, None)
        if v is not None:
            return v
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")


@dataclass
class ClipObjective:
    """coef * (1 - cos(image, text)) for a fixed text; the text embedding is computed once."""

    model: object  # CLIPModel
    text_embeds: torch.Tensor  # [1, D], L2-normalized, no grad
    coef: float
    size: int  # CLIP input side (224 for ViT-B/16)
    official: bool = False  # the released code's CLIP input: x0 rounded to fp16, pixels mapped to [0, 1] twice
    _norm: dict = field(default_factory=dict, repr=False, compare=False)  # (device, dtype) -> (mean, std)

    @classmethod
    @torch.no_grad()
    def build(cls, clip_model: str, prompt: str, *, device, dtype, coef: float,
              official: bool = False) -> "ClipObjective":
        model, tok = load_clip(clip_model, device, dtype)
        max_len = min(int(tok.model_max_length), int(model.config.text_config.max_position_embeddings))
        ids = tok([prompt], truncation=True, max_length=max_len, return_tensors="pt").input_ids.to(device)
        text = _f32(_embeds(model.get_text_features(input_ids=ids)))
        return cls(model=model, text_embeds=F.normalize(text, dim=-1), coef=float(coef),
                   size=int(model.config.vision_config.image_size), official=official)

    def preprocess(self, image01: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> CLIP input: adaptive average pool to size x size, mean/std once."""
        x = F.adaptive_avg_pool2d(image01, (self.size, self.size))
        if self.official:
            # Released CLIPDrag, utils/drag_utils.py L218 (HEAD; L212 already clamped to [0, 1]):
            # `image_aug(pred_image).add(1).div(2)` maps the [0, 1] image to [0.5, 1] before Normalize.
            x = x.add(1).div(2)
        mean, std = self._mean_std(x)
        return (x - mean) / std

    def _mean_std(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalization constants on x's device, built once: a host-to-device copy per call would be a
        sync in the drag loop and cannot be captured in a CUDA graph."""
        key = (x.device, x.dtype)
        if key not in self._norm:
            self._norm[key] = (torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device)[None, :, None, None],
                          torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device)[None, :, None, None])
        return self._norm[key]

    def loss(self, image01: torch.Tensor) -> torch.Tensor:
        """Scalar coef * (1 - cos) of the (single) image in [0, 1] against the text."""
        dtype = next(self.model.parameters()).dtype
        img = _f32(_embeds(self.model.get_image_features(pixel_values=self.preprocess(image01).to(dtype))))
        cos = (F.normalize(img, dim=-1) * self.text_embeds).sum(-1).mean()
        return self.coef * (1 - cos)


def decode_x0(model, schedule, z: torch.Tensor, t: int, c: torch.Tensor, *, x0_fp16: bool = False) -> torch.Tensor:
    """Differentiable image in [0, 1] of the DDIM x0-prediction of latent z at timestep t (conditioning c).
    x0_fp16: round x0 to fp16 and scale it in fp16 before decoding, as the released code does."""
    eps = model.unet(z.to(model.dtype), t, encoder_hidden_states=c, return_dict=False)[0]
    x0 = schedule.pred_x0(_f32(eps), t, z)
    if x0_fp16:
        # Released CLIPDrag, utils/drag_utils.py L209 (HEAD): `pred_image = 1 / 0.18215 * pred_x0.half()`.
        x0 = (1 / model.scaling_factor) * x0.half()
    else:
        x0 = x0 / model.scaling_factor
    x = model.vae.decode(x0.to(model.dtype), return_dict=False)[0]
    return (_f32(x) / 2 + 0.5).clamp(0, 1)


def global_gradient(model, schedule, z: torch.Tensor, t: int, c: torch.Tensor,
                    objective: ClipObjective) -> tuple[torch.Tensor, torch.Tensor]:
    """(G_g = d loss / dz [same shape and dtype as z], loss), from a detached copy of z (spec B4)."""
    with torch.enable_grad():
        zd = z.detach().clone().requires_grad_(True)
        loss = objective.loss(decode_x0(model, schedule, zd, t, c, x0_fp16=objective.official))
        (g,) = torch.autograd.grad(loss, zd)
    return g, loss.detach()


__all__ = ["DEFAULT_CLIP", "CLIP_MEAN", "CLIP_STD", "build_tiny_clip", "load_clip", "ClipObjective", "decode_x0",
           "global_gradient"]
