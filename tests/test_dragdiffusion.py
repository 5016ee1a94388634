"""DragDiffusion's defining mechanisms on the tiny model (spec dragdiffusion 1.6-1.8)."""

import numpy as np
import pytest
import torch

import fastdrag
from fastdrag.kernels import reference as ref_ops
from fastdrag.lora import ADAPTER
from fastdrag.pipeline import decode, encode

from .conftest import FAST

PTS = [((40, 60), (72, 60))]


class Spy:
    """Wraps a module-level function and records the arguments of each call."""

    def __init__(self, monkeypatch, module, name, replace=None):
        self.calls = []
        real = getattr(module, name)

        def wrapper(*a, **k):
            self.calls.append((a, k))
            return (replace or real)(*a, **k)

        monkeypatch.setattr(module, name, wrapper)


def test_defaults_are_the_official_ones():
    c = fastdrag.make_config("dragdiffusion")
    assert (c.lora_steps, c.lora_lr, c.lora_batch_size, c.lora_rank) == (80, 5e-4, 4, 16)
    assert (c.inversion_strength, c.n_inference_step, c.n_pix_step, c.latent_lr, c.lam) == (0.7, 50, 80, 0.01, 0.1)
    assert (c.r_m, c.r_p, c.start_step, c.start_layer, c.unet_feature_idx) == (1, 3, 0, 10, 3)


def test_motion_supervision_loss_falls_when_points_are_held(tiny_model, image, monkeypatch):
    # Hold the handles fixed (tracking returns them unchanged): the optimizer must then drive the loss down.
    monkeypatch.setattr(ref_ops, "track", lambda feat, ref, h, *a, **k: h.clone())
    r = fastdrag.Editor(tiny_model).edit(image, PTS, lora_steps=2, n_pix_step=15)
    loss = r.trace["ms_loss"]
    assert len(loss) == 15
    assert loss[-3:].mean() < 0.7 * loss[0], loss


def test_motion_supervision_is_a_unit_step_with_weight_9(tiny_model, image, monkeypatch):
    spy = Spy(monkeypatch, ref_ops, "patch_l1")
    r = fastdrag.Editor(tiny_model).edit(image, PTS, **FAST)
    hs = r.trace["handles"]
    assert len(spy.calls) == r.trace["steps"] > 0
    for step, (a, k) in enumerate(spy.calls):
        feat, ref, centers, radius = a
        h = hs[step]
        assert radius == 1
        torch.testing.assert_close((centers - h).norm(dim=1), torch.ones(len(h)))  # unit direction d_i
        assert not ref.requires_grad  # sg(F) at the current handle
        torch.testing.assert_close(ref, ref_ops.sample_patches(feat.detach(), h, 1))
    expected = 9 * ref_ops.patch_l1(*spy.calls[0][0]).sum()
    torch.testing.assert_close(r.trace["ms_loss"][0], expected.detach())


def test_tracking_reference_is_F0_at_the_initial_handle(tiny_model, image, monkeypatch):
    spy = Spy(monkeypatch, ref_ops, "track")
    ed = fastdrag.Editor(tiny_model)
    r = ed.edit(image, PTS, lora_steps=2, n_pix_step=10)
    assert len(spy.calls) == r.trace["steps"] - 1 >= 2  # tracking from iteration 1 on
    # independent F0: features of the inverted latent, upsampled to the half-resolution grid
    prep = next(iter(ed._prepared.values()))
    feats = {}
    hook = tiny_model.unet.up_blocks[2].register_forward_hook(lambda m, i, o: feats.setdefault("f", o))
    with torch.no_grad():
        tiny_model.unet(prep.zt, 681, encoder_hidden_states=prep.text_emb)
    hook.remove()
    F0 = torch.nn.functional.interpolate(feats["f"], (64, 64), mode="bilinear")[0]
    h0 = r.trace["handles_init"].long()
    expected = F0[:, h0[:, 0], h0[:, 1]].t()
    for (feat, refv, handles, targets, radius), k in spy.calls:
        assert radius == 3
        torch.testing.assert_close(refv, expected)
    assert not torch.equal(r.trace["handles"][-1], r.trace["handles"][0])  # the handle moved; the reference did not


def test_handles_already_at_target_give_the_reference_reconstruction(tiny_model, image, monkeypatch):
    """The loop's zero-step exit. The API refuses a pair this short (Request.check_drags) because it never moves;
    the check is lifted here to reach the loop's own stop test before the first update."""
    monkeypatch.setattr(fastdrag.pipeline.Request, "check_drags", lambda self, stop: None)
    ed = fastdrag.Editor(tiny_model)
    r = ed.edit(image, [((60, 60), (62, 61))], **FAST)  # 1 feature px apart: reached before any update
    prep = next(iter(ed._prepared.values()))
    assert r.trace["steps"] == 0 and len(r.trace["ms_loss"]) == 0
    assert torch.equal(r.trace["z_dragged"], prep.zt)
    z = prep.zt
    with torch.no_grad():
        for t in prep.schedule.denoise_timesteps:  # the reference branch alone, plain attention
            z = prep.schedule.step(tiny_model.unet(z, t, encoder_hidden_states=prep.text_emb).sample, t, z)
    ref = np.asarray(decode(tiny_model, z, (128, 128))).astype(int)
    assert np.abs(np.asarray(r.image).astype(int) - ref).max() <= 1  # uint8 truncation of equal floats


def test_lora_changes_the_unet_and_is_active_in_inversion_drag_and_denoise(tiny_model, image):
    fastdrag.Editor(tiny_model).edit(image, PTS, lora_steps=1, n_pix_step=1)  # a rank-16 adapter now exists
    calls, per_stage = [0], {}

    def count(*_):
        calls[0] += 1

    def progress(p):  # forwards since the last report belong to the reported stage
        per_stage[p.stage] = per_stage.get(p.stage, 0) + calls[0]
        calls[0] = 0

    hooks = [m.register_forward_hook(count) for n, m in tiny_model.unet.named_modules()
             if n.endswith(f"lora_A.{ADAPTER}")]
    assert len(hooks) == 4 * 32
    ed = fastdrag.Editor(tiny_model)
    try:
        ed.edit(image, PTS, progress=progress, **FAST)
    finally:
        for h in hooks:
            h.remove()
    for stage in ("lora", "invert", "drag", "denoise"):
        assert per_stage.get(stage, 0) > 0, (stage, per_stage)
    prep = next(iter(ed._prepared.values()))
    assert any(torch.count_nonzero(w) for n, w in prep.lora.items() if "lora_B" in n)  # trained: up != 0
    z, c = prep.zt, prep.text_emb
    with torch.no_grad():
        with_lora = tiny_model.unet(z, 681, encoder_hidden_states=c).sample
        tiny_model.unet.disable_adapters()
        without = tiny_model.unet(z, 681, encoder_hidden_states=c).sample
        tiny_model.unet.enable_adapters()
    assert (with_lora - without).abs().max() > 1e-6


def test_mask_term_holds_the_latent_outside_the_mask(tiny_model, image):
    mask = np.zeros((128, 128), np.uint8)
    mask[30:100, 20:110] = 1
    ed = fastdrag.Editor(tiny_model)
    free = ed.edit(image, PTS, mask=mask, lam=0.0, **FAST)
    held = ed.edit(image, PTS, mask=mask, lam=1e3, **FAST)
    zt = next(iter(ed._prepared.values())).zt
    m = torch.nn.functional.interpolate(torch.from_numpy(mask).float()[None, None], (64, 64))
    outside = 1 - torch.nn.functional.interpolate(m, (16, 16))
    moved = lambda r: ((r.trace["z_dragged"] - zt).abs() * outside).sum()  # noqa: E731
    assert free.trace["steps"] == held.trace["steps"] == FAST["n_pix_step"]
    assert moved(held) < 0.5 * moved(free), (moved(held), moved(free))


@pytest.mark.parametrize("method", ["dragdiffusion", "dragtext"])
def test_fast_backend_matches_reference_on_cpu(tiny_model, image, method):
    """The fast path's ops (lazy upsample, fused patch L1, tracking kernels) give the same trajectory."""
    ed = fastdrag.Editor(tiny_model)
    a = ed.edit(image, PTS, method=method, backend="reference", **FAST)
    b = ed.edit(image, PTS, method=method, backend="fast", **FAST)
    assert torch.equal(a.trace["handles"], b.trace["handles"])
    torch.testing.assert_close(a.trace["ms_loss"], b.trace["ms_loss"], rtol=1e-4, atol=1e-5)
    diff = np.abs(np.asarray(a.image).astype(int) - np.asarray(b.image).astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())


def _transformer_blocks_in_execution_order(unet):
    """SD-1.x's 16 BasicTransformerBlocks as the official controller counts them (spec 1.8): 0-5 down, 6 mid,
    7-15 up_blocks[1..3]."""
    parts = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [blk for part in parts for t2d in (getattr(part, "attentions", None) or [])
            for blk in t2d.transformer_blocks]


def _self_attention_outputs(attn, x):
    """(own, mutual) outputs of a self-attention on the batch x [B, n, C], computed from scratch: every branch on
    its own K/V, or every branch on branch 0's K/V."""
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    B, n, C = q.shape
    d = C // attn.heads

    def heads(t):
        return t.reshape(t.shape[0], -1, attn.heads, d).transpose(1, 2)

    def attend(kk, vv):
        w = torch.softmax(heads(q) @ heads(kk).transpose(-1, -2) / d ** 0.5, dim=-1)
        o = (w @ heads(vv)).transpose(1, 2).reshape(B, n, C)
        return attn.to_out[1](attn.to_out[0](o))

    return attend(k, v), attend(k[:1].expand_as(k), v[:1].expand_as(v))


def test_mutual_self_attention_in_the_final_denoising_follows_start_layer_and_start_step(tiny_model, image):
    """Spec 1.8: while [reference, edited] is denoised, the edited branch's self-attention (attn1) in transformer
    blocks >= start_layer reads the reference branch's K/V from denoising step start_step on, and its own K/V
    elsewhere; the reference branch always attends to itself. Every attn1 output is classified by recomputing
    both candidates from its input."""
    blocks = _transformer_blocks_in_execution_order(tiny_model.unet)
    assert len(blocks) == 16
    seen, step = [], [-1]

    def count_pair_steps(module, args, kwargs):
        if (args[0] if args else kwargs["sample"]).shape[0] == 2:  # a denoising step of the pair
            step[0] += 1

    def classify(idx):
        def hook(attn, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            if x.shape[0] != 2:
                return
            with torch.no_grad():
                own, mutual = _self_attention_outputs(attn, x)
            torch.testing.assert_close(out[0], own[0], rtol=1e-4, atol=1e-5)  # the reference branch: itself
            gap = (own[1] - mutual[1]).abs().max()
            err_own, err_mut = (out[1] - own[1]).abs().max(), (out[1] - mutual[1]).abs().max()
            assert min(err_own, err_mut) < 1e-5 < 1e-2 * gap, (idx, step[0], err_own, err_mut, gap)
            seen.append((step[0], idx, bool(err_mut < err_own)))
        return hook

    hooks = [tiny_model.unet.register_forward_pre_hook(count_pair_steps, with_kwargs=True)]
    hooks += [b.attn1.register_forward_hook(classify(i), with_kwargs=True) for i, b in enumerate(blocks)]
    ed = fastdrag.Editor(tiny_model)
    kw = dict(lora_steps=0, n_pix_step=2, inversion_strength=0.16)  # 8 denoising steps: 141, 121, ..., 1
    runs = {}
    try:
        for start_layer, start_step in [(10, 0), (13, 3)]:  # the defaults, then an override of both
            seen.clear()
            step[0] = -1
            r = ed.edit(image, PTS, start_layer=start_layer, start_step=start_step, **kw)
            assert r.trace["steps"] == 2
            runs[(start_layer, start_step)] = {(s, i) for s, i, m in seen if m}
            assert sorted((s, i) for s, i, _ in seen) == [(s, i) for s in range(8) for i in range(16)]
    finally:
        for h in hooks:
            h.remove()
    for (start_layer, start_step), mutual in runs.items():
        assert mutual == {(s, i) for s in range(start_step, 8) for i in range(start_layer, 16)}, \
            (start_layer, start_step, sorted(mutual))
    assert runs[(10, 0)] != runs[(13, 3)]


def test_ddim_inversion_reaches_t_edit(tiny_model, image):
    """Spec 1.4: z0 = VAE posterior mean * scaling factor; for t = 1, 21, ..., 681 (the first 35 of the reversed
    50-step schedule, strength 0.7): eps = UNet(z, t, c), z = inv_step(eps, t, z). The prepared zt is the latent
    after the step to t = 681 = t_edit."""
    ed = fastdrag.Editor(tiny_model)
    r = ed.edit(image, PTS, lora_steps=0, n_pix_step=1)  # the defaults: 50 steps, strength 0.7
    prep = next(iter(ed._prepared.values()))
    expected_ts = list(range(1, 682, 20))
    assert len(expected_ts) == 35 and expected_ts[-1] == 681
    assert prep.schedule.t_edit == 681 and r.trace["steps"] == 1
    c = tiny_model.encode_prompt("")
    z = encode(tiny_model, fastdrag.pipeline.load_image(image))
    with torch.no_grad():
        for t in expected_ts:
            z = prep.schedule.inv_step(tiny_model.unet(z, t, encoder_hidden_states=c).sample, t, z)
    torch.testing.assert_close(prep.zt, z, rtol=0, atol=0)
