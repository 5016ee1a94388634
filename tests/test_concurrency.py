"""One model used from several threads (a web front end's workers): the calls are serialised on model.lock, so
each thread gets exactly what it gets alone. Bit equality holds: same process, same tensors, same ops."""

import threading

import numpy as np
import pytest

import fastdrag
from tests.conftest import smooth_image

TINY = dict(lora_steps=2, n_pix_step=3, n_inference_step=10)  # a small, complete edit: LoRA, inversion, drag
REQUESTS = [
    (smooth_image(64, 64, seed=0), [((20, 30), (40, 34))], "a ball"),
    (smooth_image(64, 64, seed=1), [((40, 20), (30, 44))], "a cup"),
]


@pytest.fixture(scope="module")
def alone(tiny_model):
    """Each request's result on its own, one after the other."""
    return [fastdrag.Editor(tiny_model).edit(img, pts, prompt=p, **TINY) for img, pts, p in REQUESTS]


def in_threads(call) -> list:
    """call(i, request) for every request, each in its own thread, started together. Returns results or raised
    exceptions, in request order."""
    start = threading.Barrier(len(REQUESTS))
    out: list = [None] * len(REQUESTS)

    def run(i, req):
        start.wait()
        try:
            out[i] = call(i, req)
        except Exception as e:  # noqa: BLE001 - reported by the test
            out[i] = e

    threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate(REQUESTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def assert_same(results, alone):
    for i, (r, ref) in enumerate(zip(results, alone)):
        assert not isinstance(r, Exception), f"request {i} raised {r!r}"
        assert np.array_equal(np.asarray(r.image), np.asarray(ref.image)), f"request {i}: another image than alone"
        assert r.points == ref.points


def test_two_threads_on_one_model_get_what_each_gets_alone(tiny_model, alone):
    results = in_threads(lambda i, r: fastdrag.edit(r[0], r[1], prompt=r[2], model=tiny_model, **TINY))
    assert_same(results, alone)


def test_two_threads_on_one_editor_get_what_each_gets_alone(tiny_model, alone):
    ed = fastdrag.Editor(tiny_model)
    results = in_threads(lambda i, r: ed.edit(r[0], r[1], prompt=r[2], **TINY))
    assert_same(results, alone)
    again = in_threads(lambda i, r: ed.edit(r[0], r[1], prompt=r[2], **TINY))  # both prepared: cache hits
    assert_same(again, alone)



def test_a_copied_model_has_its_own_lock(tiny_model):
    import copy

    twin = copy.deepcopy(tiny_model)  # a lock cannot be copied: the copy gets a fresh one
    assert twin.lock is not tiny_model.lock and twin.unet is not tiny_model.unet
    with tiny_model.lock:
        assert twin.lock.acquire(blocking=False)
        twin.lock.release()
