"""Input checks with no holes and messages that say what is wrong (issue 18, item 8). Everything here is refused or
warned before the first UNet pass; where an edit is called, a later check (cuda_graph_stages='on' on the CPU) stops it
right after the checks under test, so no test runs an edit."""

import builtins
import warnings

import numpy as np
import pytest
from PIL import Image

import fastdrag
from fastdrag.api import resolve_execution
from fastdrag.config import make_config
from fastdrag.errors import ConfigError, InvalidInputError
from fastdrag.pipeline import make_request

from .conftest import smooth_image

PTS = [((40, 60), (60, 60))]
STOP = dict(cuda_graph_stages="on")  # refused on a CPU model after the input checks: ends the call before any work


def _stopped_edit(call, *args, **kw):
    """Run an edit that the cuda_graph_stages check stops; return the warnings recorded on the way."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError, match="cuda_graph_stages='on' needs a model on a CUDA device"):
            call(*args, **kw, **STOP)
    return rec


# -- points ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [True, False, np.bool_(True)])
def test_a_bool_is_not_a_coordinate(image, bad):
    with pytest.raises(InvalidInputError, match=rf"handle 0 .*the coordinate {bad!r} is a bool, not a number"):
        make_request(image, [((bad, 40), (60, 60))])
    with pytest.raises(InvalidInputError, match="target 0 .*is a bool"):
        make_request(image, [((40, 40), (60, bad))])


def test_a_string_is_not_a_coordinate(image):
    with pytest.raises(InvalidInputError, match=r"the coordinate '40' is a str, not a number"):
        make_request(image, [(("40", 60), (60, 60))])


def test_numpy_and_0d_coordinates_are_numbers(image):
    import torch

    req = make_request(image, [((np.int64(40), np.float32(60)), (torch.tensor(60.0), np.array(60)))])
    assert req.points == [((40.0, 60.0), (60.0, 60.0))]


def test_a_points_string_is_refused_with_the_list_it_means(image):
    with pytest.raises(InvalidInputError) as e:
        make_request(image, "40,60:60,60")
    msg = str(e.value)
    assert "not the string '40,60:60,60'" in msg and "did you mean points=[((40.0, 60.0), (60.0, 60.0))]?" in msg
    assert "((hx, hy), (tx, ty)) pairs" in msg
    with pytest.raises(InvalidInputError, match=r"point pair 0 is the string '40,60:60,60'.*\(\(hx, hy\), \(tx, "):
        make_request(image, ["40,60:60,60"])


def test_a_flat_alternating_list_gets_the_pairs_hint(image):
    flat = [[40, 60], [60, 60], [20, 20], [30, 40]]  # GoodDrag's points.json "points"
    with pytest.raises(InvalidInputError) as e:
        make_request(image, flat)
    msg = str(e.value)
    assert "did you mean pairs ((hx, hy), (tx, ty))?" in msg and "fastdrag.pairs_from_flat(points)" in msg
    with pytest.raises(InvalidInputError, match="odd count"):
        make_request(image, flat[:3])
    req = make_request(image, fastdrag.pairs_from_flat(flat))
    assert req.points == [((40.0, 60.0), (60.0, 60.0)), ((20.0, 20.0), (30.0, 40.0))]
    assert fastdrag.pairs_from_flat({"points": flat}) == fastdrag.pairs_from_flat(np.array(flat))


def test_pairs_from_flat_refuses_what_it_cannot_pair():
    with pytest.raises(InvalidInputError, match="odd count"):
        fastdrag.pairs_from_flat([[1, 2], [3, 4], [5, 6]])
    with pytest.raises(InvalidInputError, match=r"point 1 must be an \[x, y\] pair of numbers, got \[3, True\]"):
        fastdrag.pairs_from_flat([[1, 2], [3, True]])
    with pytest.raises(InvalidInputError, match="'points' list"):
        fastdrag.pairs_from_flat({"pts": []})


# -- masks ----------------------------------------------------------------------------------------------------------


def _rect_mask(value=255, dtype=np.uint8):
    m = np.zeros((128, 128), dtype)
    m[20:100, 20:100] = value
    return m


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_mask_with_nan_or_inf_says_so(image, bad):
    m = _rect_mask(1.0, np.float32)
    m[50, 50] = bad
    with pytest.raises(InvalidInputError, match=f"mask contains {'NaN' if np.isnan(bad) else 'inf'} \\(1 pixels\\)"):
        make_request(image, PTS, mask=m)


def test_an_all_negative_mask_is_reported_as_such(image):
    with pytest.raises(InvalidInputError, match=r"16384 negative values \(every pixel: an all-negative mask\)"):
        make_request(image, PTS, mask=np.full((128, 128), -1.0))
    m = _rect_mask(1, np.int16)
    m[0, :5] = -3
    with pytest.raises(InvalidInputError, match="mask has 5 negative values, min -3"):
        make_request(image, PTS, mask=m)


def test_a_lossy_mask_is_thresholded_as_official_and_warned_once(image, tmp_path):
    path = tmp_path / "mask.jpg"
    Image.fromarray(_rect_mask()).save(path, quality=60)
    decoded = np.asarray(Image.open(path).convert("L"))
    n = int(((decoded != 0) & (decoded != 255)).sum())
    assert n > 0  # JPEG makes in-between values at the rectangle's edges
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        req = make_request(image, PTS, mask=str(path))
    hits = [w for w in rec if "values other than 0 and 255" in str(w.message)]
    assert len(hits) == 1 and f"mask has {n} pixels" in str(hits[0].message)
    assert "every value > 0 counts as editable" in str(hits[0].message) and hits[0].filename == __file__
    assert np.array_equal(req.mask, decoded > 0)  # the official threshold: uint8(mask > 0)
    for clean in (_rect_mask(), _rect_mask(1), _rect_mask(True, bool), _rect_mask(1.0, np.float32)):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            make_request(image, PTS, mask=clean)
        assert not [w for w in rec if "values other than" in str(w.message)]
    soft = _rect_mask(1.0, np.float32)
    soft[20, 20:30] = 0.5
    with pytest.warns(UserWarning, match="mask has 10 pixels with values other than 0 and 1"):
        make_request(image, PTS, mask=soft)


def test_a_handle_outside_the_mask_is_warned_by_name(image):
    pts = [((40, 60), (60, 60)), ((110, 110), (90, 100))]  # handle 1 lies outside the 20..100 square
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        make_request(image, pts, mask=_rect_mask())
    outside = [str(w.message) for w in rec if "outside the editable mask" in str(w.message)]
    assert len(outside) == 1 and outside[0].startswith("handle 1 (x=110, y=110)")


# -- files ----------------------------------------------------------------------------------------------------------


def test_a_truncated_image_file_is_a_clear_error_and_leaves_no_file_open(tmp_path, monkeypatch):
    path = tmp_path / "cut.png"
    Image.fromarray(smooth_image()).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    opened = []
    real_open = builtins.open

    def tracking_open(*a, **k):
        f = real_open(*a, **k)
        opened.append(f)
        return f

    monkeypatch.setattr(builtins, "open", tracking_open)
    with pytest.raises(InvalidInputError, match=r"could not read image .*cut.png: .*truncated"):
        make_request(str(path), PTS)
    mask_path = tmp_path / "cutmask.png"
    real_open(mask_path, "wb").write(real_open(path, "rb").read())
    with pytest.raises(InvalidInputError, match=r"could not read mask .*cutmask.png"):
        make_request(smooth_image(), PTS, mask=str(mask_path))
    mine = [f for f in opened if str(getattr(f, "name", "")).startswith(str(tmp_path))]
    assert mine and all(f.closed for f in mine)


# -- the edit call: seed, prompt, radii, compile, warnings at the caller's line -------------------------------------


def test_numpy_integer_seeds_are_taken_and_bool_seeds_refused(tiny_model, image):
    ed = fastdrag.Editor(tiny_model)
    for seed in (np.int64(42), np.int32(7), np.uint8(3)):
        _stopped_edit(ed.edit, image, PTS, seed=seed)  # past the seed check, stopped by the cuda_graph_stages one
    for seed in (True, np.bool_(False), 4.0, -1):
        with pytest.raises(ConfigError, match="seed must be an int"):
            ed.edit(image, PTS, seed=seed)


def test_a_prompt_over_77_tokens_is_warned_with_its_count(tiny_model, image):
    prompt = "a photo of a cat sitting on a red sofa next to a window, " * 3
    n = len(tiny_model.tokenizer.tokenize(prompt)) + 2
    assert n > 77
    rec = _stopped_edit(fastdrag.edit, image, PTS, prompt=prompt, model=tiny_model)
    hits = [w for w in rec if "CLIP tokens" in str(w.message)]
    assert len(hits) == 1 and f"prompt is {n} CLIP tokens" in str(hits[0].message)
    assert f"the last {n - 77} are cut off" in str(hits[0].message) and hits[0].filename == __file__
    rec = _stopped_edit(fastdrag.edit, image, PTS, prompt="a photo of a cat", model=tiny_model)
    assert not [w for w in rec if "CLIP tokens" in str(w.message)]
    rec = _stopped_edit(fastdrag.edit, image, PTS, method="clipdrag", edit_prompt=prompt, clip_model="tiny",
                        model=tiny_model)
    assert [w for w in rec if f"edit_prompt is {n} CLIP tokens" in str(w.message)]


@pytest.mark.parametrize("method,name,limit", [("dragdiffusion", "r_m", 31), ("dragdiffusion", "r_p", 31),
                                               ("clipdrag", "r_p", 31), ("gooddrag", "r1", 31),
                                               ("gooddrag", "r2", 31)])
def test_radii_larger_than_the_feature_map_are_refused(tiny_model, image, method, name, limit):
    ed = fastdrag.Editor(tiny_model)
    with pytest.raises(ConfigError, match=rf"{name}=1000 .* 64x64 feature map .* {name} can be at most {limit} here"):
        ed.edit(image, PTS, method=method, **{name: 1000}, **STOP)
    _stopped_edit(ed.edit, image, PTS, method=method, **{name: limit})  # the limit itself passes


def test_compile_unet_on_the_cpu_is_warned_at_the_callers_line(tiny_model):
    with pytest.warns(RuntimeWarning, match=r"compile_unet='on' on cpu: torch.compile .* takes minutes") as rec:
        ex = resolve_execution(make_config("dragdiffusion", compile_unet="on"), tiny_model)
    assert ex.compile_unet and rec[0].filename == __file__  # warned, not refused: it works, slowly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_execution(make_config("dragdiffusion"), tiny_model)  # auto: off on the CPU, no warning


def test_the_multiple_of_8_warning_points_at_the_callers_line(tiny_model):
    img = smooth_image(100, 100)
    for call in (fastdrag.edit, fastdrag.Editor(tiny_model).edit):
        kw = {"model": tiny_model} if call is fastdrag.edit else {}
        rec = _stopped_edit(call, img, PTS, **kw)
        hits = [w for w in rec if "not a multiple of 8" in str(w.message)]
        assert len(hits) == 1 and hits[0].filename == __file__, (call, [(w.filename, w.lineno) for w in hits])


def test_points_may_come_from_a_generator(image):
    req = make_request(image, (pair for pair in PTS))
    assert req.points == [((40.0, 60.0), (60.0, 60.0))]
