"""The face: input checking, result shape, seeds, the Editor cache, the CLI."""

import numpy as np
import pytest
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
])
def test_bad_options_are_clear_errors(tiny_model, image, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        fastdrag.edit(image, PTS, model=tiny_model, **kwargs)


def test_errors_are_value_errors():
    assert issubclass(InvalidInputError, ValueError) and issubclass(ConfigError, ValueError)
    assert issubclass(fastdrag.ModelLoadError, ValueError)


@pytest.mark.parametrize("hw", [(128, 128), (100, 75)])
def test_edit_returns_an_image_of_the_input_size(tiny_model, hw):
    h, w = hw
    img = Image.fromarray(smooth_image(h, w))
    r = fastdrag.edit(img, [((20, 30), (40, 35))], model=tiny_model, prompt="a ball", **FAST)
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
    ed.edit(image, PTS, inversion_strength=0.6, **FAST)
    assert len(calls) == 4  # a new inversion strength re-inverts but reuses the LoRA


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
    assert img.size == (2 * 192 + 8, 128)
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
