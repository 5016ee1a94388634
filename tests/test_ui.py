"""The web UI's pure logic (fastdrag/ui.py): point list, mask from the brush layer, upload size, the request it
builds for Editor.edit, progress across stages, session files. The browser tests are in test_ui_browser.py."""

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")

from fastdrag import InvalidInputError, make_config  # noqa: E402
from fastdrag import ui  # noqa: E402


def test_points_pair_up_in_click_order():
    assert ui.pairs_from_points([[1, 2], [3, 4], [5, 6], [7, 8]]) == [((1.0, 2.0), (3.0, 4.0)), ((5.0, 6.0), (7.0, 8.0))]


@pytest.mark.parametrize("points, match", [([], "no points"), ([[1, 2], [3, 4], [5, 6]], "point 3 is a handle without")])
def test_half_pair_or_no_point_cannot_run(points, match):
    with pytest.raises(InvalidInputError, match=match):
        ui.pairs_from_points(points)


def test_upload_is_resized_to_width_512_unless_kept():
    img = Image.new("RGB", (1024, 300))
    assert ui.fit_upload(img, keep_size=False).size == (512, 150)
    assert ui.fit_upload(img, keep_size=True).size == (1024, 300)
    assert ui.fit_upload(Image.new("RGBA", (100, 400)), False).size == (512, 2048)


def _layer(w, h, box):
    rgba = np.zeros((h, w, 4), np.uint8)
    x0, y0, x1, y1 = box
    rgba[y0:y1, x0:x1] = (255, 255, 255, 255)
    rgba[0, 0] = (255, 255, 255, 60)  # an antialiased brush edge: under half opacity is not painted
    return ui.image_to_data_url(Image.fromarray(rgba, "RGBA"))


def test_mask_from_the_brush_layer():
    m = ui.mask_from_layer(_layer(40, 30, (5, 6, 15, 20)), (40, 30))
    assert m.shape == (30, 40) and m.dtype == bool
    assert m.sum() == 10 * 14 and m[6:20, 5:15].all()
    assert ui.mask_from_layer(None, (40, 30)) is None
    assert ui.mask_from_layer(_layer(40, 30, (0, 0, 0, 0)), (40, 30)) is None  # nothing painted = no mask
    back = ui.mask_from_layer(ui.mask_to_data_url(m), (40, 30))
    assert np.array_equal(back, m)
    with pytest.raises(InvalidInputError, match="the mask layer is 40x30, the image 41x30"):
        ui.mask_from_layer(_layer(40, 30, (5, 6, 15, 20)), (41, 30))


def test_request_carries_points_mask_and_typed_options():
    img = Image.new("RGB", (192, 128))
    state = {"image": img, "points": [[40, 60], [70, 60]], "mask": _layer(192, 128, (10, 10, 50, 40))}
    opts = {"seed": 7.0, "lora_steps": 3.0, "n_pix_step": 2, "latent_lr": 0.05, "drag_end_step": 5, "fuse_cof": 0.1}
    kw = ui.build_request(state, "dragdiffusion", None, "a cat", "", opts)
    assert kw["image"] is img and kw["points"] == [((40.0, 60.0), (70.0, 60.0))]
    assert kw["mask"].sum() == 40 * 30 and kw["mask"][10:40, 10:50].all()
    assert kw["seed"] == 7 and type(kw["seed"]) is int
    assert kw["lora_steps"] == 3 and type(kw["lora_steps"]) is int and type(kw["n_pix_step"]) is int
    assert kw["latent_lr"] == 0.05 and kw["prompt"] == "a cat" and kw["method"] == "dragdiffusion"
    assert "drag_end_step" not in kw and "fuse_cof" not in kw and "preset" not in kw  # not DragDiffusion options
    g = ui.build_request(state, "gooddrag", "bench", "", "", opts)
    assert g["drag_end_step"] == 5 and g["preset"] == "bench" and "n_pix_step" not in g
    c = ui.build_request({**state, "extra_options": {"clip_model": "tiny"}}, "clipdrag", None, "p", "a dog", opts)
    assert c["edit_prompt"] == "a dog" and c["fuse_cof"] == 0.1 and c["clip_model"] == "tiny"
    with pytest.raises(InvalidInputError, match="lora_steps must be a whole number"):
        ui.build_request(state, "dragdiffusion", None, "", "", {"lora_steps": 2.5})
    with pytest.raises(InvalidInputError, match="upload an image first"):
        ui.build_request({"image": None}, "dragdiffusion", None, "", "", {})


def test_request_built_by_the_ui_runs(tiny_model):
    import fastdrag

    state = {"image": Image.fromarray(np.full((128, 128, 3), 120, np.uint8)), "points": [[40, 60], [70, 60]],
             "mask": None}
    kw = ui.build_request(state, "dragdiffusion", None, "", "", {"lora_steps": 0, "n_pix_step": 1,
                                                               "n_inference_step": 10})
    res = fastdrag.Editor(tiny_model).edit(**kw)
    assert res.image.size == (128, 128) and res.timings["lora"] == 0


def test_options_shown_follow_the_method():
    assert "n_pix_step" in ui.visible_options("dragdiffusion") and "drag_end_step" not in ui.visible_options("dragdiffusion")
    assert "drag_end_step" in ui.visible_options("gooddrag") and "n_pix_step" not in ui.visible_options("gooddrag")
    assert "fuse_cof" in ui.visible_options("clipdrag")
    d = ui.option_defaults("clipdrag", "bench", {"lora_steps": 1})
    assert d["n_pix_step"] == 40 and d["lora_steps"] == 1 and d["seed"] == 42


def test_progress_runs_once_across_the_stages():
    cfg = make_config("dragdiffusion", lora_steps=4, n_pix_step=10, n_inference_step=10)
    tr = ui.ProgressTracker(cfg)
    seen = [tr.update(s, i, n) for s, n in (("lora", 4), ("invert", 7), ("drag", 10), ("denoise", 7))
            for i in range(1, n + 1)]
    assert seen == sorted(seen) and seen[-1] == 1.0 and 0 < seen[0] < 0.1
    # a re-drag reports no LoRA or inversion: its first report already counts them as done
    tr2 = ui.ProgressTracker(cfg)
    assert tr2.update("drag", 1, 10) > tr.total["lora"] * 2 / (2 * 4 + 7 + 2 * 10 + 2 * 7)
    assert tr2.eta() is None  # no rate from one report


def test_timings_say_what_was_skipped():
    t = ui.timings_text({"lora": 0.0, "invert": 0.0, "drag": 1.0, "denoise": 0.5, "decode": 0.1, "total": 1.6})
    assert "skipped (cached): LoRA, inversion" in t
    assert "skipped" not in ui.timings_text({"lora": 2.0, "invert": 1.0, "total": 3})


def test_session_round_trip():
    img = Image.fromarray((np.arange(64 * 96 * 3) % 251).astype(np.uint8).reshape(64, 96, 3))
    mask = _layer(96, 64, (1, 2, 30, 40))
    data = ui.session_dict({"image": img, "points": [[1, 2], [3, 4]], "mask": mask}, {"method": "gooddrag"},
                           {"final_handles": [[3, 4]]})
    image, points, m, settings = ui.load_session(data)
    assert np.array_equal(np.asarray(image), np.asarray(img)) and points == [[1, 2], [3, 4]]
    assert m == mask and settings == {"method": "gooddrag"} and data["result"]["final_handles"] == [[3, 4]]
    with pytest.raises(InvalidInputError, match="not a fastdrag session"):
        ui.load_session({"image": "x"})


def test_draw_handles_marks_the_points():
    out = ui.draw_handles(Image.new("RGB", (100, 80)), [((10, 20), (60, 40))], [(30, 30)])
    a = np.asarray(out)
    assert tuple(a[20, 10]) == (224, 32, 32) and tuple(a[40, 60]) == (32, 80, 224) and tuple(a[30, 30]) == (255, 208, 0)
