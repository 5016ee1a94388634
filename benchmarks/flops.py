"""FLOPs of fastdrag's stages: analytic (the floor) and counted (what fastdrag's code computes).

    python -m benchmarks.flops      # TFLOP per stage and per drag step, every method, with and without a mask

Analytic: the SD-1.x UNet's conv, linear and attention matmuls (norms and activations ignored) from a diffusers
UNet2DConditionModel config, so it follows the model it is given. For SD-1.5 at a 64x64 latent it gives 401.6 GMAC
= 0.80 TFLOP per forward (the spec's anchors.md derives the same figure). Counted: fastdrag's own stages run on the
SD-1.5 architecture built on the meta device (shapes, no values, no compute: seconds on a CPU) under
torch.utils.flop_counter.FlopCounterMode. tests/test_flops.py holds the two equal.
"""

from __future__ import annotations

import collections
import contextlib
import functools

import torch
from torch.utils.flop_counter import FlopCounterMode


def unet_forward_macs(cfg: dict, h: int, w: int, text_len: int = 77, batch: int = 1,
                      stop: int | None = None) -> dict[str, float]:
    """MACs of one UNet forward (conv, linear, attn, total), and "grad": the MACs of the backward to the latent
    only (frozen weights: every conv and linear on the latent's path computes its input gradient, none of the
    time-embedding or text projections does; self-attention's backward is twice its matmuls, cross-attention's,
    which needs no gradient for the text's K and V, once). stop = k ends the pass after the feature block k
    (0 = mid block, k = up_blocks[k-1]), as fastdrag's truncated pass does."""
    ch = list(cfg["block_out_channels"])
    lpb = cfg["layers_per_block"]
    d_txt = cfg["cross_attention_dim"]
    temb = ch[0] * 4
    down_types, up_types = cfg["down_block_types"], cfg["up_block_types"]
    macs = {"conv": 0.0, "linear": 0.0, "attn": 0.0, "grad": 0.0}

    def conv(cin, cout, k, hh, ww):
        m = batch * cin * cout * k * k * hh * ww
        macs["conv"] += m
        macs["grad"] += m

    def lin(fin, fout, n, grad=True):
        m = batch * fin * fout * n
        macs["linear"] += m
        macs["grad"] += m if grad else 0

    def attn(m, times):
        macs["attn"] += batch * m
        macs["grad"] += batch * m * times

    def resnet(cin, cout, hh, ww):
        conv(cin, cout, 3, hh, ww)
        lin(temb, cout, 1, grad=False)
        conv(cout, cout, 3, hh, ww)
        if cin != cout:
            conv(cin, cout, 1, hh, ww)

    def transformer(c, hh, ww):
        n = hh * ww
        conv(c, c, 1, hh, ww)  # proj_in
        lin(c, 3 * c, n)  # self-attention q, k, v
        lin(c, c, n)  # out
        attn(2 * n * n * c, 2)
        lin(c, c, n)  # cross-attention q
        lin(d_txt, 2 * c, text_len, grad=False)  # k, v from the text
        lin(c, c, n)
        attn(2 * n * text_len * c, 1)
        lin(c, 8 * c, n)  # GEGLU
        lin(4 * c, c, n)
        conv(c, c, 1, hh, ww)  # proj_out

    def total():
        macs["total"] = macs["conv"] + macs["linear"] + macs["attn"]
        return macs

    lin(ch[0], temb, 1, grad=False)
    lin(temb, temb, 1, grad=False)
    sizes = [(h >> i, w >> i) for i in range(len(ch))]
    conv(cfg["in_channels"], ch[0], 3, h, w)
    skips = [(ch[0], sizes[0])]
    cin = ch[0]
    for i, typ in enumerate(down_types):
        for _ in range(lpb):
            resnet(cin, ch[i], *sizes[i])
            cin = ch[i]
            if typ.startswith("CrossAttn"):
                transformer(ch[i], *sizes[i])
            skips.append((cin, sizes[i]))
        if i < len(ch) - 1:
            conv(cin, cin, 3, *sizes[i + 1])
            skips.append((cin, sizes[i + 1]))
    resnet(ch[-1], ch[-1], *sizes[-1])
    transformer(ch[-1], *sizes[-1])
    resnet(ch[-1], ch[-1], *sizes[-1])
    if stop == 0:
        return total()
    rch, rsz = ch[::-1], sizes[::-1]
    cur = ch[-1]
    for i, typ in enumerate(up_types):
        for _ in range(lpb + 1):
            sc, _ = skips.pop()
            resnet(cur + sc, rch[i], *rsz[i])
            cur = rch[i]
            if typ.startswith("CrossAttn"):
                transformer(cur, *rsz[i])
        if i < len(ch) - 1:
            conv(cur, cur, 3, *rsz[i + 1])
        if stop == i + 1:
            return total()
    conv(ch[0], cfg["out_channels"], 3, h, w)
    return total()


def drag_step_flops(cfg: dict, h: int, w: int, feature_idx: int = 3, masked: bool = False) -> float:
    """The floor of one drag step (DragDiffusion, GoodDrag): the UNet forward, through the feature block only without
    a mask term, and the backward to the latent only (frozen weights). 2 FLOPs per MAC."""
    m = unet_forward_macs(cfg, h, w, stop=None if masked else feature_idx)
    return 2 * (m["total"] + m["grad"])


# ----------------------------------------------------------------------------------------------------------
# Counted, on the meta device

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)  # SD-1.5's unet/config.json
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)


class _NoModules:
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class Counter(FlopCounterMode):
    """FlopCounterMode without its per-module breakdown (whose backward hooks refuse torch.autograd.grad, which the
    drag loop calls), recording which counted ops ran and every convolution_backward's output_mask."""

    def __init__(self):
        super().__init__(display=False)
        self.mod_tracker = _NoModules()
        self.ops: collections.Counter = collections.Counter()
        self.conv_masks: set = set()

    def _count_flops(self, func_packet, out, args, kwargs):
        self.ops[str(func_packet)] += 1
        if func_packet is torch.ops.aten.convolution_backward:
            self.conv_masks.add(tuple(bool(b) for b in args[10]))
        return super()._count_flops(func_packet, out, args, kwargs)


@functools.lru_cache(maxsize=1)
def meta_model():
    """A DragModel of the SD-1.5 architecture on the meta device (no weights): UNet and VAE from the configs above,
    the CLIP text encoder of SD-1.5's size, the tiny tokenizer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fastdrag.model import DragModel, _tiny_tokenizer, make_scheduler

    tok = _tiny_tokenizer()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15)
        vae = AutoencoderKL(**SD15_VAE)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id))
    for m in (unet, vae, te):
        m.requires_grad_(False).eval()
    model = DragModel(unet=unet, vae=vae, text_encoder=te, tokenizer=tok, scheduler=make_scheduler(),
                     name="sd15-meta", device=torch.device("meta"), dtype=torch.float32)
    ids = tok("a photo", padding="max_length", max_length=77, truncation=True).input_ids  # on the host
    model.pad_idx = lambda prompt: ids.index(tok.eos_token_id) if tok.eos_token_id in ids[:-1] else 76
    return model


@contextlib.contextmanager
def host_reads_answer_false():
    """A meta tensor has no value: bool() of one (a drag loop's stop check) and torch.equal of two (GoodDrag's
    no-change check) answer False here, so the loops run the steps they are given; int() (a step count in a
    trace) answers 0."""
    real_bool, real_equal, real_int = torch.Tensor.__bool__, torch.equal, torch.Tensor.__int__

    def to_bool(t):
        return False if t.device.type == "meta" else real_bool(t)

    def equal(a, b):
        return False if a.device.type == "meta" else real_equal(a, b)

    def to_int(t):
        return 0 if t.device.type == "meta" else real_int(t)

    from torch.fx.experimental import _config as fx_config

    torch.Tensor.__bool__, torch.equal, torch.Tensor.__int__ = to_bool, equal, to_int
    try:
        with fx_config.patch(meta_nonzero_assume_all_nonzero=True):  # the loops' records, indexed by a bool mask
            yield
    finally:
        torch.Tensor.__bool__, torch.equal, torch.Tensor.__int__ = real_bool, real_equal, real_int


class CountingReporter:
    """A pipeline Reporter that counts the FLOPs of each stage (and checks the drag stage's autograd) instead of
    timing it."""

    def __init__(self, model):
        self.flops: collections.Counter = collections.Counter()
        self.ops: dict = {}
        self.conv_masks: dict = {}
        self.timings: dict = {}
        self.params_with_grad: dict = collections.defaultdict(set)
        self._model = model

    def __call__(self, stage, step, total, handles=None):  # as pipeline.Reporter
        pass

    @contextlib.contextmanager
    def stage(self, name: str):
        model = self._model
        seen = self.params_with_grad[name]

        def pre(mod, args):
            seen.update(n for n, p in model.unet.named_parameters() if p.requires_grad)

        hook = model.unet.conv_in.register_forward_pre_hook(pre)
        try:
            with Counter() as c:
                yield
        finally:
            hook.remove()
        self.flops[name] += c.get_total_flops()
        self.ops.setdefault(name, collections.Counter()).update(c.ops)
        self.conv_masks.setdefault(name, set()).update(c.conv_masks)


def _request(size: int, masked: bool, n_points: int = 1):
    import numpy as np

    from fastdrag.pipeline import make_request

    pts = [((size * 0.2 + 30 * i, size * 0.3), (size * 0.8 - 30 * i, size * 0.7)) for i in range(n_points)]
    mask = None
    if masked:
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[size // 8:-size // 8, size // 8:-size // 8] = 1
    return make_request(np.zeros((size, size, 3), dtype=np.uint8), pts, mask, "a photo")


def count_prepare(lora_steps: int = 1, n_inference_step: int = 2, size: int = 512, native_reuse: bool = True):
    """Counted FLOPs per stage of prepare() (LoRA fit, VAE encode + inversion) on the meta SD-1.5."""
    from fastdrag import pipeline
    from fastdrag.config import make_config

    model = meta_model()
    req = _request(size, False)
    cfg = make_config("dragdiffusion", lora_steps=lora_steps, n_inference_step=n_inference_step)
    rep = CountingReporter(model)
    with host_reads_answer_false():
        pipeline.prepare(model, req, cfg, 0, rep)
    from fastdrag.lora import set_lora

    set_lora(model.unet, None)
    return rep


def count_method(method: str, masked: bool, steps: int = 1, n_inference_step: int = 2, size: int = 512,
                 denoise: bool = True, **overrides):
    """Counted FLOPs per stage of one method's run (drag with `steps` steps, denoise) on the meta SD-1.5, from a
    prepared image (latents of the right shape, no values), with the fast path's ops and lazy upsample. With
    denoise=False the denoising passes are skipped (their latents passed through): the drag alone, faster."""
    import fastdrag.kernels as fast_ops
    from fastdrag.config import make_config
    from fastdrag.ddim import Schedule
    from fastdrag.methods import METHODS, _load_all
    from fastdrag.pipeline import DragContext, Prepared

    _load_all()
    model = meta_model()
    lat = size // model.vae_scale
    kw = dict(n_inference_step=n_inference_step)
    if method == "gooddrag":
        kw.update(drag_end_step=1, track_per_step=1, max_drag_per_track=steps)
    else:
        kw.update(n_pix_step=steps)
    if method == "clipdrag":
        kw.update(clip_model="tiny", edit_prompt="a photo")
    kw.update(overrides)
    cfg = make_config(method, **kw)
    meta = dict(device="meta", dtype=torch.float32)
    prep = Prepared(lora=None, z0=torch.empty(1, 4, lat, lat, **meta), zt=torch.empty(1, 4, lat, lat, **meta),
                    text_emb=torch.empty(1, 77, model.unet.config.cross_attention_dim, **meta),
                    schedule=Schedule.make(model.scheduler, cfg.n_inference_step, cfg.inversion_strength))
    rep = CountingReporter(model)
    ctx = DragContext(model=model, cfg=cfg, req=_request(size, masked), prep=prep, ops=fast_ops, lazy_upsample=True,
                      reporter=rep)
    from unittest import mock

    from fastdrag.methods import dragdiffusion, gooddrag

    def no_denoise(model, z_ref, z_edit, *a, **k):
        return z_ref, z_edit

    skip = [mock.patch.object(mod, "denoise_pair", no_denoise) for mod in (dragdiffusion, gooddrag)] \
        if not denoise else []
    try:
        with contextlib.ExitStack() as stack, host_reads_answer_false(), Counter() as whole:
            for p in skip:
                stack.enter_context(p)
            METHODS[method](ctx)
    finally:
        ctx.unet_features.close()
    rep.flops["all"] = whole.get_total_flops()  # the stages and anything between them (a reference pass)
    return rep


def count_call(fn) -> float:
    with Counter() as c:
        fn()
    return c.get_total_flops()


def edit_table(size: int = 512, methods=("dragdiffusion", "gooddrag", "dragtext", "clipdrag")) -> dict:
    """FLOPs per stage of one edit with each method's official defaults, counted (unit costs counted on the meta
    SD-1.5: one LoRA step, one inversion step, one drag step, one denoising step, the encode and the decode, times
    the stage's step counts) beside the floor: the UNet passes analytic (unet_forward_macs); the LoRA step, the VAE,
    DragText's text backward and CLIPDrag's CLIP term, which have no analytic model here, at their counted cost."""
    from fastdrag.config import make_config
    from fastdrag.ddim import Schedule

    model = meta_model()
    lat = size // model.vae_scale
    cfg_u = dict(model.unet.config)
    F = 2 * unet_forward_macs(cfg_u, lat, lat)["total"]
    x = torch.empty(1, 3, size, size, device="meta")
    z = torch.empty(1, 4, lat, lat, device="meta")
    enc = count_call(lambda: model.vae.encode(x))
    dec = count_call(lambda: model.vae.decode(z))
    prep = count_prepare(lora_steps=1, n_inference_step=2, size=size)  # one LoRA step, one inversion step
    lora1 = prep.flops["lora"] - enc  # the native-size image's one encode happens inside the fit
    inv1 = prep.flops["invert"]
    out = {}
    for method in methods:
        cfg = make_config(method)
        sched = Schedule.make(model.scheduler, cfg.n_inference_step, cfg.inversion_strength)
        n_inv, n_den = len(sched.inversion_timesteps), len(sched.denoise_timesteps)
        if method == "gooddrag":
            n_ref, n_drag = cfg.drag_end_step, cfg.drag_end_step * cfg.track_per_step * cfg.max_drag_per_track
        else:
            n_ref, n_drag = 0, cfg.n_pix_step
        for masked in (False, True):
            rep = count_method(method, masked, steps=1, size=size)
            den_step = rep.flops["denoise"] / max(1, len(Schedule.make(model.scheduler, 2, cfg.inversion_strength)
                                                       .denoise_timesteps))
            ref = n_ref and F  # GoodDrag's unedited trajectory, one full forward per drag timestep
            step = rep.flops["all"] - rep.flops["denoise"] - (F if n_ref else 0)
            floor_step = drag_step_flops(cfg_u, lat, lat, masked=masked)
            extra = step - floor_step if method in ("dragtext", "clipdrag") else 0.0  # text backward, CLIP pass
            counted = {"lora": cfg.lora_steps * lora1 + enc, "invert": n_inv * inv1, "drag": n_ref * ref + n_drag * step,
                       "denoise": n_den * den_step, "decode": dec}
            floor = {"lora": cfg.lora_steps * lora1 + enc, "invert": n_inv * F,
                     "drag": n_ref * F + n_drag * (floor_step + extra), "denoise": n_den * 4 * F / 2,
                     "decode": dec}
            counted["total"], floor["total"] = sum(counted.values()), sum(floor.values())
            out[(method, masked)] = {"counted": counted, "floor": floor, "step": step, "floor_step": floor_step}
    return out


def main() -> int:
    rows = edit_table()
    print("TFLOP per edit (official defaults, 512x512), counted on the meta-device SD-1.5 / floor")
    print(f"{'method':14s} {'mask':5s} " + " ".join(f"{k:>15s}" for k in ("lora", "invert", "drag", "denoise",
                                                                       "decode", "total", "per drag step")))
    for (method, masked), r in rows.items():
        c, f = r["counted"], r["floor"]
        cells = [f"{c[k] / 1e12:7.1f}/{f[k] / 1e12:<7.1f}" for k in ("lora", "invert", "drag", "denoise", "decode",
                                                                       "total")]
        cells.append(f"{r['step'] / 1e12:7.2f}/{r['floor_step'] / 1e12:<7.2f}")
        print(f"{method:14s} {str(masked):5s} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
