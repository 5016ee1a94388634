"""CLIP image-image similarity, as DragBench's drag_bench_evaluation/run_eval_similarity.py
(github.com/Yujun-Shi/DragDiffusion, commit 18eb668) reports it: `clip.load("ViT-B/32")`, both images through
clip's own preprocessing, `encode_image`, each embedding unit-normalised, their dot product. The edit is first
resized to the source size (PIL bilinear).

openai/CLIP needs torchvision, so the model is transformers' CLIPModel (`openai/clip-vit-base-patch32`: the same
weights) and the preprocessing is clip's `_transform(224)` written out with PIL: shorter side to 224 (bicubic; the
longer side int(224 * long / short), as torchvision's Resize), centre crop 224 (offsets int(round((size - 224) /
2))), RGB, [0, 1], normalised with CLIP's mean and std.
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import ModelLoadError
from .lpips import resize_to_source

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(image, n_px: int = 224) -> torch.Tensor:
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = n_px, int(n_px * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    if size != (w, h):
        image = image.resize(size, Image.BICUBIC)
    w, h = image.size
    top, left = int(round((h - n_px) / 2.0)), int(round((w - n_px) / 2.0))
    image = image.crop((left, top, left + n_px, top + n_px))
    x = torch.from_numpy(np.array(image)).float().div(255).permute(2, 0, 1)
    return ((x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))[None]


def image_embeds(model, pixels: torch.Tensor) -> torch.Tensor:
    """The projected image embedding (clip's encode_image): CLIPModel's visual projection of the pooled output."""
    out = model.vision_model(pixel_values=pixels)
    return model.visual_projection(out.pooler_output)


class CLIPSimilarityMetric:
    name = "clip"

    def __init__(self, model: str = "openai/clip-vit-base-patch32"):
        self.model_name = model

    def config(self) -> dict:
        return {"model": self.model_name, "preprocess": "clip _transform(224)"}

    def setup(self, device=None) -> None:
        from transformers import CLIPModel

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.model = CLIPModel.from_pretrained(self.model_name)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"clip metric: could not load CLIPModel {self.model_name!r}: {e}") from e
        self.model = self.model.eval().requires_grad_(False).to(self.device)

    @torch.no_grad()
    def similarity(self, source, edited) -> float:
        edited = resize_to_source(edited.convert("RGB"), source.size)
        a = image_embeds(self.model, clip_preprocess(source).to(self.device))
        b = image_embeds(self.model, clip_preprocess(edited).to(self.device))
        a = a / a.norm(dim=-1, keepdim=True)
        b = b / b.norm(dim=-1, keepdim=True)
        return float((a * b).sum().item())

    def score(self, sample, edited, record) -> dict:
        from PIL import Image

        return {"clip_sim": self.similarity(Image.fromarray(sample.image), edited)}
