"""The face: input checking, result shape, seeds, the Editor cache, the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

import fastdrag
from fastdrag import ConfigError, InvalidInputError
from fastdrag import cli
from fastdrag import lora as lora_mod

from .conftest import FAST, smooth_image

PTS = [((40, 60), (70, 60))]


@pytest.mark.parametrize("kwargs, match", [
    (dict(points=[((200, 10), (10, 10))]), "outside"),
    (dict(points=[((10, 10), (10, -1))]), "outside"),
    # 128 px -> 64-cell supervision grid: x = 127 rounds to column 64 (the official code would index past the end)
    (dict(points=[((127, 10), (10, 10))]), "rounds to column 64 of the 64x64 supervision grid"),
    (dict(points=[((10, 10), (10, 127.2))]), "rounds to row 64 of the 64x64"),
    (dict(points=[((10, 10), (10, 10))]), "equals its target"),
    (dict(points=[]), "no points"),
    (dict(points=[((10, 10),)]), "must be"),
    (dict(points=[((float("nan"), 10), (20, 10))]), "not finite"),
    (dict(mask=np.ones((64, 64), np.uint8)), "mask has shape"),
    (dict(mask=np.zeros((128, 128), np.uint8)), "no editable pixel"),
    (dict(image=np.zeros((32, 128, 3), np.uint8)), "at least 64"),
    (dict(image=np.zeros((128, 128), np.float32)), "HxWx3 uint8"),
    (dict(image="/no/such/file.png"), "not found"),
    (dict(image=42), "PIL.Image"),
    # 128 px -> 64-cell grid: a 2 px drag is 1 grid px, under stop_distance = 2, and would never move
    (dict(points=[((40, 60), (42, 60))]), "pair 0 drags 1 supervision-grid px"),
    (dict(points=[((40, 60), (40.6, 60))]), "pair 0 drags 0 supervision-grid px"),  # rounds to the same cell
    (dict(points=[((40, 60), (70, 60)), ((40.4, 60), (40, 90))]), "handles 0 .* and 1 .* fall on the same point"),
    (dict(image=Image.fromarray(np.full((128, 128), 40000, np.uint16))), "16-bit"),
    (dict(image=Image.new("RGBA", (128, 128), (10, 200, 30, 128))), "transparent pixels"),
])
def test_bad_input_is_a_clear_error(tiny_model, image, kwargs, match):
    args = dict(image=image, points=PTS, model=tiny_model, **FAST)
    args.update(kwargs)
    with pytest.raises(InvalidInputError, match=match):
        fastdrag.edit(args.pop("image"), args.pop("points"), **args)


def test_points_at_the_grids_last_cell_are_accepted(tiny_model):
    """The boundary of the supervision-grid rule: x = 126.9 rounds to column 63 (the last), and is taken as is."""
    req = fastdrag.pipeline.make_request(smooth_image(), [((126.9, 126.9), (10, 10))])
    handles, _ = req.feature_points("cpu")
    assert handles.tolist() == [[63.0, 63.0]]


def test_tiny_mask_that_vanishes_at_latent_resolution(tiny_model, image):
    mask = np.zeros((128, 128), np.uint8)
    mask[3, 3] = 1  # one pixel: nearest-downsampling to 16x16 drops it
    with pytest.raises(InvalidInputError, match="vanishes"):
        fastdrag.edit(image, PTS, mask=mask, model=tiny_model, **FAST)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="dragnoise"), "unknown method"),
    (dict(n_pix_stepz=3), "unknown option"),
    (dict(r1=4), "unknown option"),  # a GoodDrag option is not a DragDiffusion option
    (dict(latent_lr=float("nan")), "finite"),
    (dict(lam=float("inf")), "finite"),
    (dict(n_pix_step=0), "positive integer"),
    (dict(latent_lr=-1.0), "> 0"),
    (dict(inversion_strength=1.5), "inversion_strength"),
    (dict(preset="turbo"), "unknown preset"),
    (dict(backend="cuda-magic"), "backend"),
    (dict(seed=1.5), "seed"),
    (dict(seed=2 ** 70), "seed"),
    (dict(seed=-1), "seed"),
    # each field is checked against its type: no string, None or bool where a number goes, no float for an int
    (dict(lora_lr="0.01"), "lora_lr must be a number"),
    (dict(latent_lr=None), "latent_lr must be a number"),
    (dict(latent_lr=True), "latent_lr must be a number"),
    (dict(start_layer=2.5), "start_layer must be an integer"),
    (dict(optimize_text="no"), "optimize_text must be True or False"),
    # step indices against the schedule: 0.7 * 50 = 35 denoising steps
    (dict(start_step=35), "start_step=35 is past the last of the 35 denoising steps"),
    (dict(method="gooddrag", start_step=31), "past the last of the 31 denoising steps"),  # 38 - 7 dragged
    (dict(method="gooddrag", drag_end_step=39), "drag_end_step=39 is more than the 38 denoising timesteps"),
    (dict(method="gooddrag", beta=-1.0), "beta must be > 0"),
    (dict(n_inference_step=5000), "at most 1000"),
    (dict(model="tiny"), "model must be a DragModel.*load_model\\('tiny'\\)"),
])
def test_bad_options_are_clear_errors(tiny_model, image, kwargs, match):
    kwargs.setdefault("model", tiny_model)
    with pytest.raises(ConfigError, match=match):
        fastdrag.edit(image, PTS, **kwargs)


def test_numpy_scalars_are_accepted_as_options():
    cfg = fastdrag.make_config("dragdiffusion", n_pix_step=np.int64(5), latent_lr=np.float32(0.02), lam=1)
    assert (type(cfg.n_pix_step), type(cfg.latent_lr), type(cfg.lam)) == (int, float, float)
    assert (cfg.n_pix_step, cfg.lam) == (5, 1.0)


def test_errors_are_value_errors():
    assert issubclass(InvalidInputError, ValueError) and issubclass(ConfigError, ValueError)
    assert issubclass(fastdrag.ModelLoadError, ValueError)


@pytest.mark.parametrize("hw", [(128, 128), (100, 75)])
def test_edit_returns_an_image_of_the_input_size(tiny_model, hw, recwarn):
    h, w = hw
    img = Image.fromarray(smooth_image(h, w))
    r = fastdrag.edit(img, [((20, 30), (40, 35))], model=tiny_model, prompt="a ball", **FAST)
    stretch = [w for w in recwarn if "not a multiple of 8" in str(w.message)]
    assert len(stretch) == (hw == (100, 75))  # 75x100 is stretched back from 72x96, and says so
    assert r.image.size == (w, h) and r.image.mode == "RGB"
    assert len(r.points) == 1 and all(0 <= v <= max(h, w) for v in r.points[0])
    assert set(r.timings) == {"lora", "invert", "drag", "denoise", "decode", "total"}
    assert all(v >= 0 for v in r.timings.values())


def test_image_inputs_path_array_and_pil_agree(tiny_model, image, tmp_path):
    p = tmp_path / "in.png"
    Image.fromarray(image).save(p)
    a = fastdrag.edit(image, PTS, model=tiny_model, **FAST)
    b = fastdrag.edit(str(p), PTS, model=tiny_model, **FAST)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_same_seed_same_image_and_seed_matters(tiny_model, image):
    a = fastdrag.Editor(tiny_model).edit(image, PTS, seed=3, **FAST)
    b = fastdrag.Editor(tiny_model).edit(image, PTS, seed=3, **FAST)
    c = fastdrag.Editor(tiny_model).edit(image, PTS, seed=4, **FAST)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))  # the LoRA fit draws from the seed


def test_opaque_rgba_and_grayscale_images_are_taken(tiny_model, image):
    rgb = Image.fromarray(image)
    for other in (rgb.convert("RGBA"), rgb.convert("L")):
        req = fastdrag.pipeline.make_request(other, PTS)
        assert req.image.mode == "RGB" and np.array_equal(np.asarray(req.image), np.asarray(other.convert("RGB")))


def test_progress_reports_each_stage(tiny_model, image):
    seen = []
    fastdrag.Editor(tiny_model).edit(image, PTS, progress=seen.append, **FAST)
    stages = {p.stage for p in seen}
    assert {"lora", "invert", "drag", "denoise"} <= stages
    lora = [p for p in seen if p.stage == "lora"]
    assert lora[-1].step == lora[-1].total == FAST["lora_steps"]


def test_editor_reuses_preparation_and_invalidates_on_change(tiny_model, image, monkeypatch):
    calls = []
    real = lora_mod.fit_lora
    monkeypatch.setattr(lora_mod, "fit_lora", lambda *a, **k: calls.append(1) or real(*a, **k))
    ed = fastdrag.Editor(tiny_model)
    first = ed.edit(image, PTS, **FAST)
    again = ed.edit(image, [((40, 60), (60, 80))], **FAST)  # a re-drag: no LoRA, no inversion
    assert len(calls) == 1 and again.timings["lora"] == 0 and again.timings["invert"] == 0
    same = ed.edit(image, PTS, **FAST)
    assert np.array_equal(np.asarray(first.image), np.asarray(same.image))  # cache gives the same result
    ed.edit(image, PTS, lora_steps=FAST["lora_steps"] + 1, n_pix_step=FAST["n_pix_step"])
    ed.edit(image, PTS, prompt="something else", **FAST)
    other = image.copy()
    other[0, 0] ^= 1
    ed.edit(other, PTS, **FAST)
    assert len(calls) == 4  # LoRA settings, prompt and pixels are all in the key
    r = ed.edit(image, PTS, inversion_strength=0.6, **FAST)
    assert len(calls) == 4  # a new inversion strength re-inverts but reuses the LoRA
    assert r.timings["invert"] > 0 and next(reversed(ed._prepared.values())).schedule.t_edit == 581  # 30th of 1, 21..
    r = ed.edit(image, PTS, n_inference_step=25, **FAST)
    assert r.timings["invert"] > 0 and next(reversed(ed._prepared.values())).schedule.t_edit == 681  # 18th of 1, 41..


def test_editor_cache_hits_give_a_fresh_editors_result(tiny_model, image):
    """Image A, image B, then A again with another mask: the cached A (its LoRA re-activated, the new mask used)
    gives what a fresh Editor gives."""
    other = smooth_image(seed=1)
    mask = np.zeros((128, 128), np.uint8)
    mask[30:100, 20:110] = 1
    ed = fastdrag.Editor(tiny_model)
    ed.edit(image, PTS, **FAST)
    ed.edit(other, PTS, **FAST)
    again = ed.edit(image, PTS, mask=mask, **FAST)
    assert again.timings["lora"] == 0 and again.timings["invert"] == 0
    fresh = fastdrag.Editor(tiny_model).edit(image, PTS, mask=mask, **FAST)
    assert np.array_equal(np.asarray(again.image), np.asarray(fresh.image))


def test_editor_survives_a_lora_rank_change_and_back(tiny_model, image):
    """The rank-16 and rank-4 adapters have the same parameter names: a cached rank-16 LoRA must rebuild the
    rank-4 adapter, not copy into it."""
    ed = fastdrag.Editor(tiny_model)
    first = ed.edit(image, PTS, **FAST)
    ed.edit(image, PTS, lora_rank=4, **FAST)
    again = ed.edit(image, PTS, **FAST)  # cache hit for rank 16
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))


def test_a_precision_override_does_not_change_later_edits(image):
    """A bf16 edit casts the model; the next default edit is back in the loaded fp32 with the loaded weights, bit
    for bit, and equals an edit on a model that never saw bf16."""
    model = fastdrag.load_model("tiny", device="cpu")
    ed = fastdrag.Editor(model)
    ed.edit(image, PTS, precision="bf16", **FAST)
    assert model.dtype == torch.bfloat16
    after = ed.edit(image, PTS, **FAST)
    assert model.dtype == torch.float32
    fresh_model = fastdrag.load_model("tiny", device="cpu")
    def base(unet):  # the base weights, without the per-image LoRA an Editor leaves behind
        return {n.replace(".base_layer", ""): p for n, p in unet.state_dict().items() if "lora_" not in n}

    ours, theirs = base(model.unet), base(fresh_model.unet)
    assert ours.keys() == theirs.keys()
    for n, p in ours.items():
        assert torch.equal(p, theirs[n]), n  # the loaded weights back, bit for bit: no compounded bf16 rounding
    fresh = fastdrag.Editor(fresh_model).edit(image, PTS, **FAST)
    # Two separately allocated models with equal weights: a CPU may order sums by address (~1e-6 per pass), which
    # can flip a pixel's rounding by one level; weights left bf16-rounded move this edit by far more.
    diff = np.abs(np.asarray(after.image, dtype=int) - np.asarray(fresh.image, dtype=int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.allclose(after.points, fresh.points, atol=1e-4)


def test_model_casts_start_from_the_loaded_weights():
    model = fastdrag.load_model("tiny", device="cpu")
    loaded = {n: p.clone() for n, p in model.unet.named_parameters()}
    direct = {n: p.clone() for n, p in fastdrag.load_model("tiny", device="cpu").to(dtype=torch.bfloat16)
              .unet.named_parameters()}
    model.to(dtype=torch.float16).to(dtype=torch.bfloat16)  # fp16 -> bf16 alone would round twice
    assert all(torch.equal(p, direct[n]) for n, p in model.unet.named_parameters())
    model.to(dtype=torch.float32)
    assert all(torch.equal(p, loaded[n]) for n, p in model.unet.named_parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="meta"), "device 'meta' is not supported"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(dtype="fp8"), "dtype must be"),
    (dict(dtype=torch.int8), "dtype must be"),
])
def test_bad_load_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(fastdrag.ModelLoadError, match=match):
        fastdrag.load_model("tiny", **kwargs)


def test_gooddrag_progress_counts_every_denoising_step(tiny_model, image):
    seen = []
    fastdrag.Editor(tiny_model).edit(image, PTS, method="gooddrag", progress=seen.append, lora_steps=0,
                                     inversion_strength=0.16, drag_end_step=2, track_per_step=1, max_drag_per_track=1)
    denoise = [(p.step, p.total) for p in seen if p.stage == "denoise"]
    assert denoise == [(i, 8) for i in range(1, 9)]  # 2 plain steps inside AlDD, then 6 with mutual attention
    assert [(p.step, p.total) for p in seen if p.stage == "reference"] == [(1, 2), (2, 2)]


def test_cli_checks_the_output_path_before_editing(tmp_path, image, capsys, monkeypatch):
    src = tmp_path / "in.png"
    Image.fromarray(image).save(src)
    monkeypatch.setattr(fastdrag.model, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    for out, match in ((tmp_path / "no" / "o.png", "does not exist"), (tmp_path / "o.xyz", "not an image format")):
        rc = cli.main(["edit", "--model", "tiny", "--image", str(src), "--drag", "40,60:70,60", "--out", str(out)])
        assert rc == 2 and match in capsys.readouterr().err


def test_cli_edit_and_errors(tmp_path, image, capsys, monkeypatch):
    src = tmp_path / "in.png"
    Image.fromarray(image).save(src)
    out = tmp_path / "out.png"
    rc = cli.main(["edit", "--model", "tiny", "--image", str(src), "--drag", "40,60:70,60", "--out", str(out),
                   "--lora-steps", "2", "--n-pix-step", "3", "--prompt", "a disc"])
    assert rc == 0 and Image.open(out).size == (128, 128)
    assert "final handles" in capsys.readouterr().out
    rc = cli.main(["edit", "--model", "tiny", "--image", str(src), "--drag", "40,60:40,60", "--out", str(out)])
    assert rc == 2 and "equals its target" in capsys.readouterr().err
    rc = cli.main(["edit", "--model", "tiny", "--image", str(src), "--drag", "40,60:70,60", "--out", str(out),
                   "--r1", "3"])
    assert rc == 2 and "unknown option" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["edit", "--image", str(src), "--drag", "40-60", "--out", str(out)])


def test_cli_demo_writes_before_after(tmp_path, capsys):
    out = tmp_path / "demo.png"
    rc = cli.main(["demo", "--out", str(out), "--lora-steps", "2", "--n-pix-step", "2"])
    assert rc == 0
    img = Image.open(out)
    assert img.width == 2 * 192 + 8 and img.height > 128  # input | result, a legend below
    assert "RANDOM weights" in capsys.readouterr().out


@pytest.mark.parametrize("method, extra", [
    ("dragdiffusion", []),
    ("dragtext", ["--text-lam", "0.5"]),
    ("gooddrag", ["--preset", "bench", "--drag-end-step", "1", "--track-per-step", "1"]),
    ("clipdrag", ["--preset", "bench", "--clip-model", "tiny", "--edit-prompt", "a bigger disc"]),
])
def test_cli_runs_every_method(tmp_path, image, capsys, method, extra):
    src = tmp_path / "in.png"
    Image.fromarray(image).save(src)
    out = tmp_path / "out.png"
    rc = cli.main(["edit", "--model", "tiny", "--method", method, "--image", str(src), "--drag", "40,60:70,60",
                   "--out", str(out), "--lora-steps", "1", "--n-inference-step", "20", "--prompt", "a disc",
                   *(["--n-pix-step", "2"] if method != "gooddrag" else []), *extra])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert Image.open(out).size == (128, 128) and f"[{method}," in text.out
