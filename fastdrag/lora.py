"""Identity-preserving LoRA fit on the single input image (spec dragdiffusion 1.2, gooddrag 4.2).

Rank r on to_q/to_k/to_v/to_out.0 of every attention module (self and cross), scale 1, down ~ N(0, 1/r),
up = 0 (peft's "gaussian" init is exactly diffusers 0.24's LoRALinearLayer init). AdamW(lr, wd 1e-2),
constant lr, batch 4 of the same image, each item Resize(shorter side -> model resolution) + RandomCrop,
VAE posterior *sampled*, t ~ U[0, 1000), epsilon MSE, a fixed prompt embedding, no CFG.

Two things are faster than the official loop and give the same distribution: the VAE posterior of each
distinct crop is computed once and re-sampled every step (the official code re-encodes every step), and
nothing is reloaded from disk.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .compile import GraphedCall, graph_warmup

ADAPTER = "fastdrag"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _lora_params(unet) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in unet.named_parameters() if f".{ADAPTER}." in n}


def _rank(params: dict) -> int | None:
    return next((p.shape[0] for n, p in params.items() if "lora_A" in n), None)


def ensure_adapter(unet, rank: int, seed: int = 0) -> None:
    """Give the UNet a freshly initialised LoRA adapter of this rank: down ~ N(0, 1/rank^2), up = 0 (diffusers 0.24's
    LoRALinearLayer init, scale 1). The adapter modules are created once per rank and re-initialised in place, from
    `seed` alone, so that the result does not depend on what ran before."""
    from peft import LoraConfig

    if _rank(_lora_params(unet)) != rank:
        if getattr(unet, "peft_config", None) and ADAPTER in unet.peft_config:
            unet.delete_adapters(ADAPTER)
        cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS)
        unet.add_adapter(cfg, adapter_name=ADAPTER)
    device = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(_lora_params(unet).items()):  # adapter weights stay fp32 for a stable fit
            w = torch.randn(p.shape, generator=g) / rank if "lora_A" in name else torch.zeros(p.shape)
            p.data = w.to(device=device, dtype=torch.float32)
    unet.set_adapters([ADAPTER])
    unet.enable_adapters()


def get_lora(unet) -> dict[str, torch.Tensor] | None:
    params = _lora_params(unet)
    return {n: p.detach().clone() for n, p in params.items()} if params else None


def set_lora(unet, weights: dict[str, torch.Tensor] | None) -> None:
    """Activate `weights` (from get_lora) in the UNet, or switch LoRA off when None."""
    if weights is None:
        if getattr(unet, "peft_config", None) and ADAPTER in unet.peft_config:
            unet.disable_adapters()
        return
    params = _lora_params(unet)
    if set(params) != set(weights) or any(params[n].shape != w.shape for n, w in weights.items()):
        ensure_adapter(unet, _rank(weights))  # another rank: the parameter names are the same, the shapes are not
        params = _lora_params(unet)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    unet.set_adapters([ADAPTER])
    unet.enable_adapters()


def _resize_shorter(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    return image.resize((nw, nh), Image.BILINEAR)


def fit_lora(model, image: Image.Image, text_emb: torch.Tensor, *, steps: int, lr: float, batch_size: int,
             rank: int, seed: int, autocast_dtype: torch.dtype | None = None, progress=None,
             graphs: bool = False, encoded: dict | None = None) -> dict:
    """Train a fresh LoRA on `image` and leave it active in model.unet. Returns its weights.

    The random draws (crops, posterior samples, noise, timesteps) come from one CPU generator, in the same order
    whatever the execution. With `graphs` the device work of a step (noising, UNet forward and backward, the
    AdamW update) is replayed from a CUDA graph from the second step on; the draws travel in as tensors.

    `encoded`, if given, receives "mean": the VAE posterior mean of the whole image when the image is at the model's
    native size (its one crop is the image itself, as pipeline.encode would see it), for prepare() to reuse."""
    unet, vae, device = model.unet, model.vae, model.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ensure_adapter(unet, rank, seed)
    params = list(_lora_params(unet).values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                            capturable=graphs and device.type == "cuda")

    res = model.resolution
    big = _resize_shorter(image, res)
    arr = torch.from_numpy(np.asarray(big, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    arr = arr.to(device=device, dtype=model.dtype)
    H, W = arr.shape[-2:]
    alphas = torch.as_tensor(model.scheduler.alphas_cumprod, dtype=torch.float32).to(device)
    n_train = len(alphas)
    posteriors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def posterior(top, left):
        if (top, left) not in posteriors:
            with torch.no_grad():
                dist = vae.encode(arr[None, :, top:top + res, left:left + res]).latent_dist
            posteriors[(top, left)] = (dist.mean, dist.std)
        return posteriors[(top, left)]

    if encoded is not None and big.size == image.size == (res, res):  # resize to the same size is a copy
        encoded["mean"] = posterior(0, 0)[0]

    cond = text_emb.expand(batch_size, -1, -1)
    # a captured graph cannot use autocast's weight-cast cache (it would replay casts of the first step's weights)
    amp = torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=not graphs) if autocast_dtype \
        else contextlib.nullcontext()

    def train_step(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> None:
        a = alphas[t].view(-1, 1, 1, 1).to(x0.dtype)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with amp:
            pred = unet(noisy, t, encoder_hidden_states=cond, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    run = GraphedCall(train_step) if graphs else None
    unet.train()
    try:
        with graph_warmup(graphs, device):
            for step in range(steps):
                latents = []
                for _ in range(batch_size):
                    top = int(torch.randint(0, H - res + 1, (1,), generator=gen))
                    left = int(torch.randint(0, W - res + 1, (1,), generator=gen))
                    mean, std = posterior(top, left)
                    eps = torch.randn(mean.shape, generator=gen).to(device=device, dtype=mean.dtype)
                    latents.append(mean + std * eps)
                x0 = torch.cat(latents) * model.scaling_factor
                noise = torch.randn(x0.shape, generator=gen).to(device=device, dtype=x0.dtype)
                t = torch.randint(0, n_train, (batch_size,), generator=gen).to(device)
                if run is None:
                    train_step(x0, noise, t)
                else:
                    run("lora", x0, noise, t)
                if progress is not None:
                    progress("lora", step + 1, steps)
    finally:
        unet.eval()
        for p in params:
            p.requires_grad_(False)
    return get_lora(unet)


def remove_adapter(unet) -> None:
    """Take the fastdrag adapter out of the UNet entirely: every LoRA-wrapped projection is replaced by its base layer
    and the UNet's peft bookkeeping is dropped, so that it is the module it was before any adapter was added."""
    from peft.tuners.lora import LoraLayer

    for name, m in list(unet.named_modules()):
        if isinstance(m, LoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, child, m.get_base_layer())
    unet.__dict__.pop("peft_config", None)
    unet.__dict__.pop("_hf_peft_config_loaded", None)
