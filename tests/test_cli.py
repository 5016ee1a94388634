"""The command line and the checks that run before any expensive work (issue 18): resize_width, the output path,
CLIP before the LoRA fit, progress lines off a terminal, Ctrl-C, per-flag help, the demo picture."""

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import fastdrag
from fastdrag import cli
from fastdrag import clip as clip_mod
from fastdrag.config import CONFIGS, FIELD_HELP, make_config
from fastdrag.pipeline import Progress, make_request

from .conftest import smooth_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(tmp_path, arr, name="in.png"):
    path = tmp_path / name
    Image.fromarray(arr).save(path)
    return str(path)


def _no_model_load(monkeypatch):
    monkeypatch.setattr(fastdrag.model, "load_model", lambda *a, **k: pytest.fail("loaded a model"))


def _fake_edit(monkeypatch, tiny_model, progress_records=(), on_edit=None):
    """The CLI around a stand-in edit: the tiny model and an instant result, so that only the CLI's own work runs."""
    monkeypatch.setattr(fastdrag.model, "load_model", lambda *a, **k: tiny_model)

    def edit(self, image, points, *, progress=None, method="dragdiffusion", **kw):
        for p in progress_records:
            progress(p)
        if on_edit is not None:
            on_edit()
        img = Image.new("RGB", (128, 128), (90, 90, 90))
        return fastdrag.EditResult(image=img, points=[tuple(points[0][1])], timings={"total": 0.0}, method=method,
                                   config=make_config(method))

    monkeypatch.setattr(fastdrag.api.Editor, "edit", edit)


# ---------------------------------------------------------------------------------------------------------------
# item 3: resize_width


def test_resize_width_scales_image_mask_and_points_as_the_official_ui():
    img = smooth_image(200, 300)  # 300 wide, 200 high
    mask = np.zeros((200, 300), np.uint8)
    mask[50:150, 60:240] = 255
    req = make_request(img, [((60, 40), (90, 160))], mask, resize_width=150)
    assert req.size == (100, 150) and req.resized_from == (300, 200)
    assert req.points == [((30.0, 20.0), (45.0, 80.0))]
    expected = Image.fromarray(img).resize((150, 100), Image.BILINEAR)  # the official UIs' resize
    assert np.array_equal(np.asarray(req.image), np.asarray(expected))
    assert req.mask.shape == (100, 150) and req.mask[25:75, 30:120].all() and req.mask.sum() == 50 * 90
    # height int(h * width / w), truncated: 301x200 at width 150 -> 99.67 -> 99
    assert make_request(smooth_image(200, 301), [((60, 40), (90, 160))], resize_width=150).size == (99, 150)


def test_resize_width_checks_points_after_scaling_and_never_clamps():
    img = smooth_image(200, 300)
    with pytest.raises(fastdrag.InvalidInputError, match=r"scaled with the image by resize_width.*outside"):
        make_request(img, [((60, 40), (300, 160))], resize_width=150)  # x=300 -> 150: outside the 150 px image
    with pytest.raises(fastdrag.InvalidInputError, match="scaled with the image by resize_width.*column 75"):
        make_request(img, [((60, 40), (299.5, 160))], resize_width=150)  # its last half grid cell
    for bad in (0, 10, 2.5, True, "512"):
        with pytest.raises(fastdrag.ConfigError, match="resize_width"):
            make_request(img, [((60, 40), (90, 160))], resize_width=bad)


def test_edit_with_resize_width_returns_the_resized_size(tiny_model):
    img = smooth_image(256, 256)
    res = fastdrag.Editor(tiny_model).edit(img, [((80, 120), (140, 120))], resize_width=128, lora_steps=0,
                                           n_inference_step=10, inversion_strength=0.5, n_pix_step=2)
    assert res.image.size == (128, 128) and res.resized_from == (256, 256)
    # the documented relation between trace["handles"] ((row, col) on the half-resolution grid) and points (x, y)
    H, W = 128, 128
    row, col = res.trace["handles"][-1][0].tolist()
    assert res.points[0] == pytest.approx((col * W / (W // 2), row * H / (H // 2)))
    assert res.trace["handles_init"][0].tolist() == [30.0, 20.0]  # (row, col) of the resized (x=40, y=60)


def test_large_image_warns_at_the_callers_line(tiny_model):
    img = smooth_image(384, 256)  # 6x the tiny model's native 128x128 pixels
    with pytest.warns(UserWarning, match=r"resize_width=128 \(CLI --resize-width 128\)") as rec:
        with pytest.raises(fastdrag.InvalidInputError, match="equals its target"):  # stop before any work
            fastdrag.edit(img, [((10, 10), (10, 10))], model=tiny_model)
    assert [w.filename for w in rec if "resize_width" in str(w.message)] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_request(smooth_image(128, 192), [((60, 40), (90, 60))], native_side=128)  # 1.5x: no warning
        make_request(img, [((60, 40), (90, 60))], native_side=128, resize_width=128)  # resized: no warning


# ---------------------------------------------------------------------------------------------------------------
# item 4: everything that can fail is checked before the first UNet pass


def test_clip_that_fails_to_load_fails_before_any_unet_pass(tiny_model, image, monkeypatch):
    def unavailable(name):
        raise fastdrag.ModelLoadError(f"could not load CLIP model {name!r}: offline")

    monkeypatch.setattr(clip_mod, "_load_pretrained", unavailable)
    passes = []
    hook = tiny_model.unet.register_forward_pre_hook(lambda *a: passes.append(1))
    try:
        with pytest.raises(fastdrag.ModelLoadError, match="no-such/clip"):
            fastdrag.Editor(tiny_model).edit(image, [((40, 60), (70, 60))], method="clipdrag", lora_steps=2,
                                             clip_model="no-such/clip", edit_prompt="a red ball", n_pix_step=2)
    finally:
        hook.remove()
    assert passes == []  # neither the LoRA fit nor the inversion ran


def test_cli_output_path_problems_are_one_line_errors_before_the_model_loads(tmp_path, image, capsys, monkeypatch):
    src = _png(tmp_path, image)
    _no_model_load(monkeypatch)
    if os.geteuid() == 0:
        unwritable = "/sys/fastdrag-out.png"  # root may write anywhere a mode allows; sysfs refuses new files
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        unwritable = str(ro / "out.png")
    (tmp_path / "adir").mkdir()
    for out, match in ((tmp_path / "adir", "is a directory"), (unwritable, "cannot write in folder"),
                       (tmp_path / "no" / "o.png", "does not exist"), (tmp_path / "o.xbm", "cannot write an RGB")):
        rc = cli.main(["edit", "--model", "tiny", "--image", src, "--drag", "40,60:70,60", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and match in err and err.count("\n") == 1, err


def test_cli_checks_options_and_inputs_before_the_model_loads(tmp_path, image, capsys, monkeypatch):
    src = _png(tmp_path, image)
    out = str(tmp_path / "out.png")
    _no_model_load(monkeypatch)
    cases = [
        (["--drag", "-5,40:30,80"], "(x=-5, y=40) is outside"),  # parses; the point check names it
        (["--drag", "40,60:70,60", "--r1", "3"], "unknown option"),
        (["--drag", "40,60:70,60", "--mask", str(tmp_path)], "is a directory"),
        (["--drag", "40,60:70,60", "--resize-width", "10"], "resize_width=10"),
    ]
    for extra, match in cases:
        rc = cli.main(["edit", "--model", "tiny", "--image", src, "--out", out, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and match in err, err
    rc = cli.main(["edit", "--model", "tiny", "--image", str(tmp_path), "--drag", "40,60:70,60", "--out", out])
    assert rc == 2 and "is a directory, not an image file" in capsys.readouterr().err


def test_negative_drag_values_reach_argparse_as_values():
    assert cli._join_negative_drags(["edit", "--drag", "-5,40:30,80", "--drag", "1,2:3,4", "--lam", "-1"]) == \
        ["edit", "--drag=-5,40:30,80", "--drag", "1,2:3,4", "--lam", "-1"]
    assert cli._join_negative_drags(["bench", "--", "--drag", "-5,40:30,80"]) == ["bench", "--", "--drag", "-5,40:30,80"]


# ---------------------------------------------------------------------------------------------------------------
# items 7 and 9: progress off a terminal; Ctrl-C


def test_line_progress_prints_stage_starts_every_nth_step_and_ends():
    out = io.StringIO()
    lp = cli.LineProgress(out, every=2)
    for p in [Progress("lora", s, 4) for s in (1, 2, 3, 4)] + [Progress("drag", s, 10) for s in (1, 2, 3)] + \
             [Progress("denoise", s, 2) for s in (1, 2)] + [Progress("drag", 4, 10)]:
        lp(p)
    lp.close()
    raw = out.getvalue().splitlines()
    assert all(re.match(r"fastdrag: \[ *\d+\.\ds\] ", line) for line in raw), raw  # elapsed seconds
    lines = [line.split("] ", 1)[1] for line in raw]
    done = [i for i, line in enumerate(lines) if " in " in line]
    assert [lines[i].rsplit(" in ", 1)[0] for i in done] == ["lora: done, 4/4", "denoise: done, 2/2"]
    assert all(lines[i].endswith("s") for i in done)
    # the drag stopped at 3/10 while the run moved on (GoodDrag alternates; DragDiffusion stops when reached):
    # its last position is printed then, and again when the run ends inside a stage
    assert [line for i, line in enumerate(lines) if i not in done] == [
        "lora: start, 4 steps", "lora: 2/4", "drag: start, 10 steps", "drag: 2/10", "drag: 3/10",
        "denoise: start, 2 steps", "drag: 4/10"]


def test_cli_prints_progress_lines_when_stderr_is_not_a_terminal(tmp_path, image, capsys, monkeypatch, tiny_model):
    _fake_edit(monkeypatch, tiny_model, [Progress("lora", s, 20) for s in range(1, 21)])
    rc = cli.main(["edit", "--image", _png(tmp_path, image), "--drag", "40,60:70,60", "--out",
                   str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 0
    assert [line.split("] ", 1)[1] for line in err.splitlines()][:3] == ["lora: start, 20 steps", "lora: 2/20",
                                                                         "lora: 4/20"]
    assert "lora: done, 20/20" in err


def test_progress_that_is_not_callable_is_a_config_error(tiny_model, image):
    with pytest.raises(fastdrag.ConfigError, match="progress must be None or a callable"):
        fastdrag.Editor(tiny_model).edit(image, [((40, 60), (70, 60))], progress=5)


def _main_catching_interrupts(argv):
    try:
        return cli.main(argv)
    except KeyboardInterrupt:  # would stop the whole pytest session
        pytest.fail("KeyboardInterrupt escaped cli.main")


def test_ctrl_c_while_writing_leaves_no_file_and_exits_130(tmp_path, image, capsys, monkeypatch, tiny_model):
    _fake_edit(monkeypatch, tiny_model)
    src, out = _png(tmp_path, image), tmp_path / "o.png"
    out.write_bytes(b"the previous result")
    real_save = Image.Image.save

    def interrupted_save(self, fp, *a, **k):
        real_save(self, fp, *a, **k)
        if isinstance(fp, (str, os.PathLike)):
            os.truncate(fp, 10)  # half written
        else:
            fp.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    rc = _main_catching_interrupts(["edit", "--image", src, "--drag", "40,60:70,60", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 130 and err.splitlines()[-1] == "fastdrag: interrupted" and "Traceback" not in err
    assert out.read_bytes() == b"the previous result"  # untouched, not half overwritten
    assert sorted(os.listdir(tmp_path)) == ["in.png", "o.png"]  # no temporary file left behind


def test_ctrl_c_during_the_edit_is_one_line_and_exit_130(tmp_path, image, capsys, monkeypatch, tiny_model):
    def interrupt():
        raise KeyboardInterrupt

    _fake_edit(monkeypatch, tiny_model, [Progress("lora", 1, 20)], on_edit=interrupt)
    out = tmp_path / "o.png"
    rc = _main_catching_interrupts(["edit", "--image", _png(tmp_path, image), "--drag", "40,60:70,60", "--out",
                                    str(out)])
    err = capsys.readouterr().err
    assert rc == 130 and err.splitlines()[-1] == "fastdrag: interrupted" and not out.exists()


def test_sigint_to_a_running_cli(tmp_path, image):
    """A real process sent SIGINT in the middle of the LoRA fit: one line, status 130, no output file."""
    src, out = _png(tmp_path, image), tmp_path / "o.png"
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastdrag", "edit", "--model", "tiny", "--image", src, "--drag",
                             "40,60:70,60", "--out", str(out), "--lora-steps", "100000"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240  # imports and the tiny model on a loaded 2-core machine
        while not any("lora: start" in line for line in lines) and proc.poll() is None and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert any("lora: start" in line for line in lines), "".join(lines)  # inside the LoRA fit
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "fastdrag: interrupted" and "Traceback" not in err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["in.png"]


# ---------------------------------------------------------------------------------------------------------------
# item 10: help and the demo picture


def test_every_config_field_has_a_help_line():
    names = {f for cls in CONFIGS.values() for f in cls.__dataclass_fields__}
    assert sorted(n for n in names if not FIELD_HELP.get(n)) == []


def test_edit_help_says_per_flag_what_it_does_which_methods_take_it_and_the_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["edit", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--beta FLOAT largest motion-supervision step, feature px: min(beta, distance) [gooddrag, clipdrag; " \
           "default 4.0]" in text
    assert "[dragdiffusion, dragtext, clipdrag; default 80 (clipdrag: 800); clipdrag --preset bench: 40]" in text
    assert "[all methods; default 80 (gooddrag: 70)]" in text  # --lora-steps
    assert "--optimize-text, --no-optimize-text also optimize the text embedding (DragText) [all methods; default " \
           "False (dragtext: True)]" in text


def _result(points):
    img = Image.new("RGB", (128, 96), (128, 128, 128))
    return fastdrag.EditResult(image=img.copy(), points=points, timings={}, method="dragdiffusion",
                               config=make_config("dragdiffusion"))


def test_before_after_has_a_legend_and_a_reached_target_stays_visible():
    img = Image.new("RGB", (128, 96), (128, 128, 128))
    pts = [((30, 40), (60, 40))]
    pic = cli.before_after(img, _result([(60.0, 40.0)]), pts)  # the handle reached its target exactly
    w, h = img.size
    assert pic.width == 2 * w + 8 and pic.height > h
    arr = np.asarray(pic)
    r = max(3, w // 100)
    ring = max(2, r // 2)
    ox = w + 8
    # the target's ring is drawn over the final handle's dot (it covers the dot's edge) and shows around it
    assert [tuple(arr[40, ox + 60 + d]) for d in range(r + ring + 2)] == \
        [cli.FINAL] * r + [cli.TARGET] * (ring + 1) + [(128, 128, 128)]
    legend = {tuple(c) for c in arr[h:].reshape(-1, 3)}
    assert {cli.HANDLE, cli.TARGET, cli.FINAL} <= legend
    assert any(c != (255, 255, 255) and len(set(c)) == 1 for c in legend)  # the (grey/black) label text
