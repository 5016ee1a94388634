"""Cancelling an edit from its progress callback (fastdrag.Cancelled), and Progress.handles."""

import numpy as np
import pytest
import torch

import fastdrag
from fastdrag import Cancelled
from fastdrag import pipeline


PTS = [((40, 60), (70, 60))]
QUICK = dict(lora_steps=2, n_pix_step=4)


def _unet_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.unet.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


class CancelAt:
    """A progress callback that raises Cancelled at the n-th report of `stage`, then counts UNet forwards."""

    def __init__(self, model, stage: str, n: int = 1):
        self.stage, self.n, self.seen, self.after = stage, n, 0, 0
        self.cancelled = False
        self._hook = model.unet.register_forward_hook(lambda *a: self._count())

    def _count(self):
        self.after += self.cancelled

    def __call__(self, p):
        assert not self.cancelled, "progress reported after the cancel"
        if p.stage == self.stage:
            self.seen += 1
            if self.seen == self.n:
                self.cancelled = True
                raise Cancelled

    def close(self):
        self._hook.remove()


def test_cancelled_is_not_an_input_error():
    assert issubclass(Cancelled, Exception) and not issubclass(Cancelled, ValueError)


@pytest.mark.parametrize("stage", ["lora", "invert", "drag", "denoise"])
def test_cancel_stops_within_a_step_and_puts_everything_back(tiny_model, image, stage):
    ed = fastdrag.Editor(tiny_model)
    before = _unet_state(tiny_model)
    cb = CancelAt(tiny_model, stage, n=2)
    try:
        with pytest.raises(Cancelled):
            ed.edit(image, PTS, progress=cb, **QUICK)
    finally:
        cb.close()
    assert cb.cancelled and cb.after == 0  # no UNet pass ran once the callback raised
    assert _same_state(before, _unet_state(tiny_model))  # no adapter left behind, base weights as they were
    assert not ed._prepared and not ed._loras  # no half-filled cache entry
    assert tiny_model.dtype == torch.float32
    if stage == "drag":  # the Editor works as if the cancelled call never happened
        got = ed.edit(image, PTS, **QUICK)
        ref = fastdrag.Editor(tiny_model).edit(image, PTS, **QUICK)
        assert got.timings["lora"] > 0 and got.points == ref.points
        assert np.array_equal(np.asarray(got.image), np.asarray(ref.image))


def test_cancel_of_a_redrag_keeps_the_prepared_image(tiny_model, image):
    """A cancel after a finished edit puts back that edit's LoRA (also when the cancelled run fitted another) and
    keeps its cache entry, so the next re-drag still skips the LoRA fit and the inversion."""
    ed = fastdrag.Editor(tiny_model)
    ed.edit(image, PTS, **QUICK)
    before = _unet_state(tiny_model)
    keys = list(ed._prepared), list(ed._loras)
    for kwargs in (dict(), dict(lora_rank=4), dict(merge_lora="on")):  # the same image; a new LoRA; merged weights
        stage = "lora" if kwargs.get("lora_rank") else "drag"
        cb = CancelAt(tiny_model, stage, n=2)
        try:
            with pytest.raises(Cancelled):
                ed.edit(image, [((40, 60), (60, 80))], progress=cb, **QUICK, **kwargs)
        finally:
            cb.close()
        assert _same_state(before, _unet_state(tiny_model)), kwargs
        assert (list(ed._prepared), list(ed._loras)) == keys, kwargs
    again = ed.edit(image, [((40, 60), (60, 80))], **QUICK)
    assert again.timings["lora"] == 0 and again.timings["invert"] == 0


def test_cancel_puts_the_dtype_back(tiny_model, image):
    ed = fastdrag.Editor(tiny_model)
    cb = CancelAt(tiny_model, "drag")
    try:
        with pytest.raises(Cancelled):
            ed.edit(image, PTS, progress=cb, precision="bf16", lora_steps=0, n_pix_step=4)
    finally:
        cb.close()
        seen_dtype = tiny_model.dtype
        tiny_model.to(dtype=torch.float32)  # the session model must not stay bf16 if the assert below fails
    assert seen_dtype == torch.float32


@pytest.mark.parametrize("method, kwargs", [
    ("dragdiffusion", QUICK),
    ("gooddrag", dict(lora_steps=0, inversion_strength=0.16, drag_end_step=2, track_per_step=2, max_drag_per_track=2)),
])
def test_progress_reports_current_handles_during_the_drag(tiny_model, image, method, kwargs):
    seen = []
    res = fastdrag.Editor(tiny_model).edit(image, PTS, method=method,
                                           progress=lambda p: seen.append((p.stage, p.handles)), **kwargs)
    drag = [h for s, h in seen if s == "drag"]
    assert drag and all(h is None for s, h in seen if s != "drag")
    assert all(len(h) == 1 and len(h[0]) == 2 for h in drag)
    assert drag[0] == [(40.0, 60.0)]  # the handle where the user put it (on the grid), before any tracking moves it
    if method == "dragdiffusion":  # (GoodDrag tracks again after its last drag step)
        assert drag[-1] == res.points  # the last report is where the drag left the handle
    assert len(set(map(tuple, drag))) > 1  # and it moved in between


def test_progress_handles_cost_nothing_unless_read(tiny_model, image, monkeypatch):
    calls = []
    real = pipeline.Request.to_image_points
    monkeypatch.setattr(pipeline.Request, "to_image_points", lambda self, h: calls.append(1) or real(self, h))
    fastdrag.Editor(tiny_model).edit(image, PTS, progress=lambda p: None, **QUICK)
    assert len(calls) == 1  # the result's final points only
