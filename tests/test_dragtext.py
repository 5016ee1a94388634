"""DragText on DragDiffusion: the text embedding is optimized alongside the latent (spec dragtext A)."""

import numpy as np
import pytest
import torch

import fastdrag
from fastdrag import cli

from .conftest import FAST

PTS = [((40, 60), (72, 60))]
PROMPT = "a red disc"


def test_defaults():
    c = fastdrag.make_config("dragtext")
    assert c.optimize_text and (c.text_lr, c.text_lam, c.latent_lr, c.n_pix_step) == (0.004, 0.1, 0.01, 80)


def test_text_embedding_changes_during_the_drag(tiny_model, image):
    r = fastdrag.Editor(tiny_model).edit(image, PTS, prompt=PROMPT, method="dragtext", **FAST)
    c = tiny_model.encode_prompt(PROMPT)
    assert r.trace["steps"] > 0
    assert (r.trace["c_edit"] - c).abs().max() > 1e-3


def test_strong_regularization_pins_the_prompt_tokens_only(tiny_model, image):
    pad = tiny_model.pad_idx(PROMPT)
    assert pad == 1 + len(PROMPT.replace(" ", ""))  # BOS + one byte-level token per non-space character
    c = tiny_model.encode_prompt(PROMPT)
    ed = fastdrag.Editor(tiny_model)
    far = [((40, 60), (100, 60))]  # not reached within the steps below

    def deviation(text_lam):
        r = ed.edit(image, far, prompt=PROMPT, method="dragtext", text_lam=text_lam, lora_steps=2, n_pix_step=12)
        assert r.trace["steps"] == 12
        return (r.trace["c_edit"] - c).abs()[0].amax(dim=1)  # per token

    lr = 0.004
    free, pinned = deviation(0.0), deviation(1e4)
    assert free[:pad].min() >= 5 * lr  # without regularization every token moves (Adam: about lr per step)
    assert pinned[:pad].max() <= 2 * lr, pinned[:pad]  # regularized: held within about one Adam step
    assert pinned[pad:].min() >= 5 * lr  # the first EOS and the padding stay free


def test_denoise_conditions_edit_on_c_hat_and_reference_on_c(tiny_model, image):
    seen = []

    def pre(module, args, kwargs):
        c = kwargs.get("encoder_hidden_states")
        if c is not None and c.shape[0] == 2:
            seen.append(c.detach().clone())

    h = tiny_model.unet.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        r = fastdrag.Editor(tiny_model).edit(image, PTS, prompt=PROMPT, method="dragtext", **FAST)
    finally:
        h.remove()
    c = tiny_model.encode_prompt(PROMPT)
    assert len(seen) == 35  # every remaining denoising step
    for pair in seen:
        assert torch.equal(pair[0], c[0])
        assert torch.equal(pair[1], r.trace["c_edit"][0])


def test_text_optimization_off_reproduces_dragdiffusion_exactly(tiny_model, image):
    ed = fastdrag.Editor(tiny_model)
    a = ed.edit(image, PTS, prompt=PROMPT, method="dragdiffusion", **FAST)
    b = ed.edit(image, PTS, prompt=PROMPT, method="dragtext", optimize_text=False, **FAST)
    c = ed.edit(image, PTS, prompt=PROMPT, method="dragtext", **FAST)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_latent_gradient_does_not_leak_into_the_text_and_back(tiny_model, image, monkeypatch):
    """Clean port: z's update sees only the latent loss; with text optimization on, the latent trajectory's first
    step equals plain DragDiffusion's first step (the text only changes the next forward)."""
    ed = fastdrag.Editor(tiny_model)
    a = ed.edit(image, PTS, prompt=PROMPT, method="dragdiffusion", lora_steps=2, n_pix_step=1)
    b = ed.edit(image, PTS, prompt=PROMPT, method="dragtext", lora_steps=2, n_pix_step=1)
    torch.testing.assert_close(a.trace["z_dragged"], b.trace["z_dragged"], rtol=0, atol=0)


def test_cli_dragtext(tmp_path, image):
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray(image).save(src)
    out = tmp_path / "out.png"
    assert cli.main(["edit", "--model", "tiny", "--method", "dragtext", "--image", str(src), "--drag", "40,60:70,60",
                     "--out", str(out), "--lora-steps", "2", "--n-pix-step", "2", "--text-lam", "0.5"]) == 0
    assert Image.open(out).size == (128, 128)
    with pytest.raises(fastdrag.ConfigError):
        fastdrag.make_config("dragtext", text_lr=float("nan"))
