"""Mean distance (MD), DragBench's drag_bench_evaluation/run_eval_point_matching.py with dift_sd.py
(github.com/Yujun-Shi/DragDiffusion, commit 18eb668), on DIFT features (Tang et al., NeurIPS'23):

  SD-2.1 (`stabilityai/stable-diffusion-2-1`); the image in [-1, 1] repeated `ensemble` = 8 times; VAE posterior
  *sample* times the scaling factor; noise `randn_like` of that latent (its memory format decides the draw: the VAE
  can return channels-last latents, where `randn(shape)` would give other noise); DDIMScheduler.add_noise at
  t = 261; one UNet pass with the prompt's text embedding; the output of `up_blocks[up_ft_index = 1]`, averaged
  over the ensemble; resized bilinearly to the image size. The edit is resized to the source size (PIL bilinear)
  first. For each pair: the source feature at the handle (row = y, col = x), the argmax of its cosine similarity
  over the edit's feature map, the L2 distance of that (row, col) to the target; averaged over the sample's pairs
  here (the official script averages over all pairs of the dataset at once: summary.json's `md_official` is that
  number, from each sample's `md_pairs_sum` and `md_pairs_n`; `md` is the mean of the per-sample means).

The official dift_sd.py no longer runs on current diffusers (it subclasses UNet2DConditionModel.forward and calls
the pipeline's removed `_encode_prompt`); what it computes is read from it and rebuilt on public pieces: a forward
hook on `up_blocks[1]` that stops the pass there (the official forward breaks after that block too), the tokenizer
padded to max length and `text_encoder(ids)[0]` (its `_encode_prompt` without guidance or attention mask).

Seeds: `official` seeds the global RNG once (seed 42) and draws in dataset order, as the script (order-dependent:
a resumed or sharded run draws other noise); `per-sample` reseeds with a hash of the seed and the sample id before
each of the sample's two passes (source and edit get the same noise: an unedited image scores exactly 0).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import InvalidInputError, ModelLoadError
from .lpips import resize_to_source

T, UP_FT_INDEX, ENSEMBLE = 261, 1, 8


class _Stop(Exception):
    pass


class DiftFeaturizer:
    def __init__(self, name_or_path: str, device=None, dtype=torch.float32):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet")
            self.vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae")
            self.text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder")
            self.tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")
            self.scheduler = DDIMScheduler.from_pretrained(name_or_path, subfolder="scheduler")
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"md metric: could not load the DIFT model {name_or_path!r} (SD-2.1 diffusers "
                                 f"folder or hub id): {e}") from e
        self.vae.decoder = None  # only the encoder is used
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False).eval().to(self.device, dtype)
        self.dtype = dtype

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def features(self, image: torch.Tensor, prompt: str, t: int = T, up_ft_index: int = UP_FT_INDEX,
                 ensemble: int = ENSEMBLE) -> torch.Tensor:
        """image: 1x3xHxW in [-1, 1] -> 1xCxhxw, the ensemble mean of up_blocks[up_ft_index]'s output."""
        x = image.to(self.device, self.dtype).repeat(ensemble, 1, 1, 1)
        emb = self.encode_prompt(prompt).repeat(ensemble, 1, 1)
        latents = self.vae.encode(x).latent_dist.sample() * self.vae.config.scaling_factor
        tt = torch.tensor(t, dtype=torch.long, device=self.device)
        noisy = self.scheduler.add_noise(latents, torch.randn_like(latents), tt)
        got = {}

        def hook(_m, _i, out):
            got["ft"] = out
            raise _Stop

        h = self.unet.up_blocks[up_ft_index].register_forward_hook(hook)
        try:
            self.unet(noisy, tt, encoder_hidden_states=emb)
        except _Stop:
            pass
        finally:
            h.remove()
        return got["ft"].float().mean(0, keepdim=True)


def match_distances(ft_src: torch.Tensor, ft_edit: torch.Tensor, points) -> list:
    """ft_*: 1xCxHxW at image size. points [((hx, hy), (tx, ty)), ...] -> L2 distance per pair of the argmax-cosine
    match of the handle's source feature in the edit to the target, in (row, col)."""
    _, c, h, w = ft_src.shape
    out = []
    for (hx, hy), (tx, ty) in points:
        for v in (hx, hy):
            if float(v) != int(v):
                raise InvalidInputError(f"MD: handle point ({hx}, {hy}) is not on a pixel")
        src = ft_src[0, :, int(hy), int(hx)].view(1, c, 1, 1)
        cos = F.cosine_similarity(src, ft_edit, dim=1)[0]
        r, col = np.unravel_index(int(cos.argmax()), (h, w))
        out.append(float(np.hypot(float(ty) - r, float(tx) - col)))
    return out


def _to_pm1(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).float().div(255).sub(0.5).mul(2).permute(2, 0, 1)[None]


class MeanDistanceMetric:
    name = "md"

    def __init__(self, model: str = "stabilityai/stable-diffusion-2-1", seed: int = 42, seed_mode: str = "per-sample",
                 t: int = T, up_ft_index: int = UP_FT_INDEX, ensemble: int = ENSEMBLE):
        if seed_mode not in ("official", "per-sample"):
            raise InvalidInputError(f"md seed_mode must be 'official' or 'per-sample', got {seed_mode!r}")
        self.model_name, self.seed, self.seed_mode = model, seed, seed_mode
        self.t, self.up_ft_index, self.ensemble = t, up_ft_index, ensemble

    def config(self) -> dict:
        return {"model": self.model_name, "seed": self.seed, "seed_mode": self.seed_mode, "t": self.t,
                "up_ft_index": self.up_ft_index, "ensemble": self.ensemble}

    def setup(self, device=None) -> None:
        self.dift = DiftFeaturizer(self.model_name, device)
        if self.seed_mode == "official":
            torch.manual_seed(self.seed)

    def _seed(self, sample_id: str) -> None:
        if self.seed_mode == "per-sample":
            h = hashlib.sha256(f"md:{self.seed}:{sample_id}".encode()).digest()
            torch.manual_seed(int.from_bytes(h[:8], "little") >> 1)

    def distances(self, sample_id: str, source, edited, prompt: str, points) -> list:
        from PIL import Image

        source = source if isinstance(source, Image.Image) else Image.fromarray(source)
        edited = resize_to_source(edited.convert("RGB"), source.size)
        w, h = source.size
        fts = []
        for im in (source, edited):
            self._seed(sample_id)
            ft = self.dift.features(_to_pm1(im), prompt, self.t, self.up_ft_index, self.ensemble)
            fts.append(F.interpolate(ft, (h, w), mode="bilinear"))
        return match_distances(fts[0], fts[1], points)

    def score(self, sample, edited, record) -> dict:
        d = self.distances(sample.id, sample.image, edited, sample.prompt, sample.points)
        return {"md": float(np.mean(d)), "md_pairs_sum": float(np.sum(d)), "md_pairs_n": len(d)}
