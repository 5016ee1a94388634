"""The fast path's layers, checked on the CPU (issue 7): the device stop flag (check_every), the fast backend with
it, the compiled UNet pass, LoRA merging, and the latency benchmark script. The CUDA side is tests/test_gpu.py.

Every comparison here is against the plain path on the same prepared image (one Editor, so the LoRA fit and the
inversion are shared), on the tiny model and 128x128 images.
"""

from __future__ import annotations

import functools
import math
import os
import sys

import numpy as np
import pytest
import torch

import fastdrag
import fastdrag.compile as fd_compile
from fastdrag.lora import ADAPTER, set_lora
from fastdrag.methods.dragdiffusion import optimize_latent
from fastdrag.unet import UNetFeatures, feature_block

from .conftest import smooth_image

REACH = [((40, 60), (56, 70))]  # reaches its target mid-run (step ~9 for dragdiffusion/dragtext, ~13 for clipdrag)
FAR = [((30, 40), (60, 80))]  # does not reach it within FAR_STEPS
REACH_STEPS, FAR_STEPS = 30, 10
QUICK = dict(lora_steps=2, n_inference_step=20)  # 14 denoising steps: keeps an edit around a second
METHOD_KW = {"dragdiffusion": {}, "dragtext": {}, "clipdrag": dict(clip_model="tiny", edit_prompt="a photo")}


def _pixels(result) -> np.ndarray:
    return np.asarray(result.image).astype(int)


def assert_images_close(a, b):
    """The tolerance of test_dragdiffusion.py::test_fast_backend_matches_reference_on_cpu."""
    diff = np.abs(_pixels(a) - _pixels(b))
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())


def assert_same_trajectory(base, other):
    """`other` ran past `base`'s stop with masked steps: its trajectory is `base`'s, then the final handles repeated."""
    hb, ho = base.trace["handles"], other.trace["handles"]
    assert len(ho) >= len(hb)
    assert torch.equal(ho[:len(hb)], hb)
    assert (ho[len(hb):] == hb[-1]).all()
    assert other.trace["steps"] == base.trace["steps"]
    assert other.points == base.points


class LoopSpy:
    """Counts, per edit, the iterations of the drag loop (UNet passes with a latent that requires grad; iteration 0's
    serves as the reference pass) and the host reads of the stop flag (bool() of a tensor in optimize_latent)."""

    def __init__(self, monkeypatch):
        self.forwards = self.checks = 0
        spy = self
        real_forward, real_bool = UNetFeatures.forward, torch.Tensor.__bool__

        def forward(uf, z, t, c, **kw):
            if z.requires_grad:
                spy.forwards += 1
            return real_forward(uf, z, t, c, **kw)

        def to_bool(tensor):
            if sys._getframe(1).f_code is optimize_latent.__code__:
                spy.checks += 1
            return real_bool(tensor)

        monkeypatch.setattr(UNetFeatures, "forward", forward)
        monkeypatch.setattr(torch.Tensor, "__bool__", to_bool)

    def reset(self):
        self.forwards = self.checks = 0


def expected_loop(live_steps: int, n_steps: int, k: int) -> tuple[int, int]:
    """(iterations, host checks) of the loop with check_every=k when the stop flag rises at iteration `live_steps`
    (== n_steps: never). The loop breaks at the first multiple of k at or after that iteration."""
    iters = n_steps if live_steps >= n_steps else min(math.ceil(live_steps / k) * k + 1, n_steps)
    return iters, len(range(0, iters, k))


# ----------------------------------------------------------------------------------------------------------
# 1. the device stop flag: masked steps after the stop == breaking out of the loop


@pytest.mark.parametrize("method", ["dragdiffusion", "dragtext", "clipdrag"])
def test_masked_early_stop_equals_breaking_out(tiny_model, image, monkeypatch, method):
    ed = fastdrag.Editor(tiny_model)
    spy = LoopSpy(monkeypatch)
    masked_iterations = 0
    for points, n_steps in ((REACH, REACH_STEPS), (FAR, FAR_STEPS)):
        runs = {}
        for k in (1, 4, 7):
            spy.reset()
            r = ed.edit(image, points, method=method, backend="reference", check_every=k, n_pix_step=n_steps,
                        **QUICK, **METHOD_KW[method])
            runs[k] = (r, spy.forwards, spy.checks)
        base, iters1, checks1 = runs[1]
        s = base.trace["steps"]
        if points is REACH:
            assert 0 < s < n_steps, f"{method}: the handle should reach its target mid-run, ran {s} steps"
        else:
            assert s == n_steps, f"{method}: the handle should not reach its target, stopped after {s} steps"
        assert (iters1, checks1) == expected_loop(s, n_steps, 1) == (min(s + 1, n_steps),) * 2
        for k in (4, 7):
            r, iters, checks = runs[k]
            assert torch.equal(r.trace["z_dragged"], base.trace["z_dragged"]), (method, k)
            assert torch.equal(r.trace["c_edit"], base.trace["c_edit"]), (method, k)  # DragText's text leaf
            assert torch.equal(r.trace["ms_loss"], base.trace["ms_loss"]), (method, k)
            assert_same_trajectory(base, r)
            if method == "clipdrag":
                for key in ("clip_loss", "clip_cos", "g_local_norm", "g_global_norm"):
                    assert torch.equal(r.trace[key], base.trace[key]), (key, k)
            assert np.array_equal(_pixels(r), _pixels(base)), (method, k)
            # fewer host syncs, paid for with < k masked iterations after the stop
            assert (iters, checks) == expected_loop(s, n_steps, k), (method, k, s)
            assert iters1 <= iters < iters1 + k and checks < checks1
            masked_iterations += iters - iters1
    assert masked_iterations > 0, "no run had masked iterations after its stop: the test would prove nothing"


# ----------------------------------------------------------------------------------------------------------
# 2. the fast path's layers against the reference, fp32 on the CPU


@pytest.mark.parametrize("method", ["dragdiffusion", "clipdrag"])
def test_fast_backend_with_device_stop_flag_matches_reference(tiny_model, image, method):
    """backend="fast" (Triton-interpreter ops, lazy upsample) with check_every=5 against the reference loop that
    reads the flag every step: same handles up to the reference's stop, same step count, images within tolerance."""
    ed = fastdrag.Editor(tiny_model)
    kw = dict(method=method, n_pix_step=REACH_STEPS, **QUICK, **METHOD_KW[method])
    ref = ed.edit(image, REACH, backend="reference", check_every=1, **kw)
    fast = ed.edit(image, REACH, backend="fast", check_every=5, **kw)
    s = ref.trace["steps"]
    assert 0 < s < REACH_STEPS and s % 5 != 0, s  # the fast run stops between two checks: it masks steps
    assert len(fast.trace["handles"]) > len(ref.trace["handles"])
    assert_same_trajectory(ref, fast)
    torch.testing.assert_close(fast.trace["ms_loss"], ref.trace["ms_loss"], rtol=1e-4, atol=1e-5)
    assert_images_close(ref, fast)


def _close_compiled(editor):
    for compiled in editor._compiled.values():
        compiled.close()
    editor._compiled.clear()


def check_compiled_pass(tiny_model, image, monkeypatch, backend: str, exact: bool):
    """compile_unet="on" against "off" on the same prepared image: same handles, close latents and images; then
    two more edits through the same compiled pass (other points; another image, so another LoRA) that must not
    recompile and must still match the eager pass (LoRA weights are inputs of the graph, not constants)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fd_compile, "compile_unet_features",
                        functools.partial(fd_compile.compile_unet_features, backend=backend))
    torch._dynamo.reset()
    counters.clear()
    atol = 1e-6 if exact else 1e-4
    kw = dict(n_pix_step=12, **QUICK)
    ed = fastdrag.Editor(tiny_model)
    try:
        eager = ed.edit(image, REACH, compile_unet="off", **kw)
        comp = ed.edit(image, REACH, compile_unet="on", **kw)
        assert len(ed._compiled) == 1 and counters["stats"]["unique_graphs"] == 1
        assert torch.equal(comp.trace["handles"], eager.trace["handles"])
        torch.testing.assert_close(comp.trace["z_dragged"], eager.trace["z_dragged"], rtol=0, atol=atol)
        assert_images_close(eager, comp)
        other = smooth_image(seed=1)
        with torch._dynamo.config.patch(error_on_recompile=True):
            comp2 = ed.edit(image, [((70, 50), (80, 64))], compile_unet="on", **kw)
            comp3 = ed.edit(other, REACH, compile_unet="on", **kw)
        assert counters["stats"]["unique_graphs"] == 1
        eager2 = ed.edit(image, [((70, 50), (80, 64))], compile_unet="off", **kw)
        eager3 = ed.edit(other, REACH, compile_unet="off", **kw)
        for c, e in ((comp2, eager2), (comp3, eager3)):
            assert torch.equal(c.trace["handles"], e.trace["handles"])
            torch.testing.assert_close(c.trace["z_dragged"], e.trace["z_dragged"], rtol=0, atol=atol)
            assert_images_close(e, c)
        assert not torch.equal(comp3.trace["z_dragged"], comp.trace["z_dragged"])
    finally:
        _close_compiled(ed)
        torch._dynamo.reset()


def test_compiled_unet_pass_is_one_graph_without_recompiles(tiny_model, image, monkeypatch):
    """The capture of the compiled pass (dynamo fullgraph + AOT autograd, eager kernels): ~20 s on one CPU thread.
    Inductor's code generation is the opt-in test below."""
    check_compiled_pass(tiny_model, image, monkeypatch, backend="aot_eager", exact=True)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTDRAG_SLOW_TESTS") != "1",
                    reason="inductor's first compile of the UNet pass takes ~140 s on one CPU thread with a cold "
                           "cache; set FASTDRAG_SLOW_TESTS=1 to run it")
def test_compiled_unet_pass_with_inductor_matches_eager(tiny_model, image, monkeypatch):
    check_compiled_pass(tiny_model, image, monkeypatch, backend="inductor", exact=False)


def test_compiled_unet_passes_share_one_graph(tiny_model):
    """Each Editor compiles its own UNet pass object; they must share one graph: no per-Editor hook on the UNet that
    torch.compile would guard on (with fullgraph=True the 9th recompile would raise), and reference passes (grad
    off) run eager instead of compiling a second graph. Closing every wrapper leaves the UNet without our hook."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    block = feature_block(tiny_model.unet, 3)
    n_hooks = len(block._forward_hooks)
    z = torch.randn(1, 4, 16, 16, requires_grad=True)  # as in the drag loop
    c = tiny_model.encode_prompt("")
    passes = []
    try:
        plain = UNetFeatures(tiny_model.unet, 3)
        eps0, feat0 = plain(z, 681, c)
        plain.close()
        plain.close()  # idempotent
        assert len(block._forward_hooks) == n_hooks
        first = fd_compile.compile_unet_features(UNetFeatures(tiny_model.unet, 3), backend="eager")
        passes.append(first)
        first(z, 681, c)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                passes.append(fd_compile.compile_unet_features(UNetFeatures(tiny_model.unet, 3), backend="eager"))
                eps, feat = passes[-1](z, 681, c)
                eager = UNetFeatures(tiny_model.unet, 3)  # an eager wrapper alive beside the compiled ones
                first(z, 681, c)
                eager.close()
                with torch.no_grad():
                    ref_eps, ref_feat = first(z, 681, c)  # a reference pass: eager, no second graph
        assert counters["stats"]["unique_graphs"] == 1
        assert len(block._forward_hooks) == n_hooks + 1
        for a, b in ((eps, eps0), (feat, feat0), (ref_eps, eps0), (ref_feat, feat0)):
            assert torch.equal(a.detach(), b.detach())
        # another feature block is another graph, not the cached one
        passes.append(fd_compile.compile_unet_features(UNetFeatures(tiny_model.unet, 2), backend="eager"))
        feat2 = passes[-1](z, 681, c)[1]
        other = UNetFeatures(tiny_model.unet, 2)
        assert torch.equal(feat2.detach(), other(z, 681, c)[1].detach()) and feat2.shape != feat0.shape
        other.close()
    finally:
        for p in passes:
            p.close()
        torch._dynamo.reset()
    assert len(block._forward_hooks) == n_hooks


def test_merged_lora_matches_the_adapter_and_restores_the_weights_bit_for_bit(tiny_model, image):
    ed = fastdrag.Editor(tiny_model)
    ed.edit(image, REACH, n_pix_step=2, **QUICK)  # leaves the image's LoRA active
    prep = next(iter(ed._prepared.values()))
    unet = tiny_model.unet
    # A 2-step fit barely moves lora_B off zero: make the adapter's effect large so that "merged == unmerged"
    # means something.
    g = torch.Generator().manual_seed(0)
    strong = {n: (torch.randn(w.shape, generator=g) * 0.05 if "lora_B" in n else w) for n, w in prep.lora.items()}
    base = {n: p.detach().clone() for n, p in unet.named_parameters() if f".{ADAPTER}." not in n}
    z, c, t = prep.zt, prep.text_emb, 681
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for n, m in unet.named_modules()
             if n.endswith(f"lora_A.{ADAPTER}")]
    try:
        set_lora(unet, strong)
        with torch.no_grad():
            unmerged = unet(z, t, encoder_hidden_states=c).sample
            unet.disable_adapters()
            plain = unet(z, t, encoder_hidden_states=c).sample
            unet.enable_adapters()
            assert (unmerged - plain).abs().max() > 1e-2  # the adapter matters
            with fd_compile.merged_lora(unet) as n:
                assert n == 4 * 32  # every projection
                with fd_compile.merged_lora(unet) as again:
                    assert again == 0  # already merged: nothing to do
                changed = [k for k, p in unet.named_parameters() if k in base and not torch.equal(p, base[k])]
                assert len(changed) == n  # the LoRA now lives in the base weights of every adapted projection
                calls.clear()
                merged = unet(z, t, encoder_hidden_states=c).sample
                assert calls == []  # the adapter branch is skipped
                torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
            for k, p in unet.named_parameters():
                if k in base:
                    assert torch.equal(p, base[k]), k  # restored exactly, not by subtraction
            after = unet(z, t, encoder_hidden_states=c).sample
            assert torch.equal(after, unmerged)
            with fd_compile.merged_lora(unet, on=False) as n_off:
                assert n_off == 0
            set_lora(unet, None)
            with fd_compile.merged_lora(unet) as n_disabled:
                assert n_disabled == 0  # adapters disabled: nothing to fold
    finally:
        for h in hooks:
            h.remove()
        set_lora(unet, prep.lora)


def test_merged_lora_survives_an_error_and_bf16_does_not_drift(tiny_model, image):
    """The weights come back even when the edit fails inside the merged block, and merging in bf16 many times
    leaves the base weights exactly as they were (a subtract-to-unmerge would drift by a rounding per edit)."""
    ed = fastdrag.Editor(tiny_model)
    ed.edit(image, REACH, n_pix_step=2, **QUICK)
    prep = next(iter(ed._prepared.values()))
    unet = tiny_model.unet
    g = torch.Generator().manual_seed(1)
    strong = {n: (torch.randn(w.shape, generator=g) * 0.05 if "lora_B" in n else w) for n, w in prep.lora.items()}
    fp32 = {k: v.clone() for k, v in unet.state_dict().items()}  # the fp32 -> bf16 -> fp32 trip is lossy
    try:
        unet.to(torch.bfloat16)
        set_lora(unet, strong)
        base = {n: p.detach().clone() for n, p in unet.named_parameters()}
        with pytest.raises(RuntimeError, match="boom"):
            with fd_compile.merged_lora(unet):
                raise RuntimeError("boom")
        for _ in range(20):
            with fd_compile.merged_lora(unet) as n:
                assert n == 4 * 32
        for k, p in unet.named_parameters():
            assert torch.equal(p, base[k]), k
    finally:
        unet.to(torch.float32)
        unet.load_state_dict(fp32)
        set_lora(unet, prep.lora)


# ----------------------------------------------------------------------------------------------------------
# 2b. the drag iteration as a CUDA graph sees it: the capture itself needs a GPU (tests/test_gpu.py); what makes it
# correct is checked here. A stand-in graph replays the captured iteration by calling it again, while it checks
# the two properties a real graph relies on: the iteration reads nothing on the host (no value can steer Python),
# and it keeps every tensor it carries across iterations in place (a graph replays into the same memory).

FASTDRAG_DIR = os.path.dirname(fastdrag.__file__)
HOST_READS = ("__bool__", "item", "tolist", "numpy", "cpu", "__int__", "__float__", "__index__", "new_tensor")


class HostReadGuard:
    """While armed, a host read of a tensor (or a host-to-device constant) made by code under `roots` (fastdrag's
    own) raises."""

    def __init__(self, monkeypatch, roots=(FASTDRAG_DIR,)):
        self.armed = False
        self.roots = tuple(roots)
        for name in HOST_READS:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._guard(name, real))
        for name in ("tensor", "as_tensor"):
            monkeypatch.setattr(torch, name, self._guard(f"torch.{name}", getattr(torch, name)))

    def _guard(self, name, real):
        guard = self

        def guarded(*args, **kwargs):
            if guard.armed and sys._getframe(1).f_code.co_filename.startswith(guard.roots):
                frame = sys._getframe(1)
                raise AssertionError(f"host read {name} in the captured iteration at "
                                     f"{frame.f_code.co_filename}:{frame.f_lineno}")
            return real(*args, **kwargs)
        return guarded


def carried_tensors(loop) -> dict[str, tuple[int, int]]:
    """(id, data_ptr) of every tensor a drag iteration carries to the next one."""
    named = {"z": loop.z, "handles": loop.handles, "done": loop.done, "i": loop.rec.i}
    named.update({f"rec.{k}": v for k, v in loop.rec.buffers.items()})
    leaves = [("z", loop.opt)] + ([("text", loop.text.opt)] if loop.text is not None else [])
    if loop.text is not None:
        named["text.value"] = loop.text.value
    for tag, opt in leaves:
        for p, state in opt.state.items():
            named.update({f"{tag}.adam.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return {k: (id(v), v.data_ptr()) for k, v in named.items()}


class StandInGraph:
    """Replays `step` by calling it under the armed guard. For a drag iteration (a LatentLoop method) it also checks
    that the carried state keeps its tensors."""

    captured: list = []

    def __init__(self, step, guard):
        self.step, self.guard, self.replays = step, guard, 0
        self.loop = getattr(step, "__self__", None)
        self.layout = carried_tensors(self.loop) if self.loop is not None else None
        StandInGraph.captured.append(self)

    def replay(self):
        self.guard.armed = True
        try:
            self.step()
        finally:
            self.guard.armed = False
        self.replays += 1
        if self.layout is not None:
            assert carried_tensors(self.loop) == self.layout, "the iteration re-bound or re-allocated carried state"


@pytest.fixture
def stand_in_graph(monkeypatch):
    """Edits with cuda_graph on, on the CPU: the loop takes its graph path, capture_graph returns a StandInGraph."""
    import fastdrag.api as api
    import fastdrag.methods.dragdiffusion as dd

    guard = HostReadGuard(monkeypatch)
    real = api.resolve_execution
    monkeypatch.setattr(api, "resolve_execution",
                        lambda cfg, model: real(cfg.replace(cuda_graph="off"), model)._replace(
                            cuda_graph=cfg.cuda_graph == "on"))
    monkeypatch.setattr(dd, "capture_graph", lambda step: StandInGraph(step, guard))
    StandInGraph.captured = []
    StandInGraph.guard = guard
    return StandInGraph.captured


@pytest.mark.parametrize("method", ["dragdiffusion", "dragtext", "clipdrag"])
def test_graph_path_matches_the_eager_loop_and_reads_nothing_on_the_host(tiny_model, image, method,
                                                                         stand_in_graph):
    ed = fastdrag.Editor(tiny_model)
    for points, n_steps, k in ((REACH, REACH_STEPS, 1), (REACH, REACH_STEPS, 4), (FAR, FAR_STEPS, 3)):
        kw = dict(method=method, backend="fast", n_pix_step=n_steps, check_every=k, **QUICK, **METHOD_KW[method])
        eager = ed.edit(image, points, cuda_graph="off", **kw)
        assert eager.trace["cuda_graph"] is False and not stand_in_graph
        graphed = ed.edit(image, points, cuda_graph="on", **kw)
        (graph,) = stand_in_graph
        stand_in_graph.clear()
        assert graphed.trace["cuda_graph"] is True
        s = eager.trace["steps"]
        assert graph.replays >= (s - 2 if points is REACH else n_steps - 2) > 0, (graph.replays, s)
        assert graphed.trace["steps"] == s
        # the graph path runs the stopping iteration whole, masked; the eager loop breaks inside it (k == 1), or
        # runs the same masked iterations (k > 1): either way the same numbers
        assert_same_trajectory(eager, graphed)
        for key in ("z_dragged", "c_edit", "ms_loss"):
            assert torch.equal(graphed.trace[key], eager.trace[key]), (method, k, key)
        if method == "clipdrag":
            for key in ("clip_loss", "clip_cos", "g_local_norm", "g_global_norm"):
                assert torch.equal(graphed.trace[key], eager.trace[key]), (key, k)
                assert len(graphed.trace[key]) == s
        assert np.array_equal(_pixels(graphed), _pixels(eager)), (method, k)


@pytest.mark.parametrize("method, extra", [("dragdiffusion", dict(start_step=3)), ("gooddrag", {})])
def test_stage_graphs_match_the_eager_stages(tiny_model, image, monkeypatch, method, extra):
    """cuda_graph_stages="on" on the CPU with stand-in graphs: the LoRA fit replays one captured training step and
    gives the eager fit's weights bit for bit; inversion and denoising replay one captured UNet pass per attention
    mode, with the timestep as a device tensor, and give the eager edit's image bit for bit. DragDiffusion with
    start_step=3 denoises with plain attention for 3 steps, then mutual: two graphs."""
    import fastdrag.api as api

    guard = HostReadGuard(monkeypatch)
    captured = StandInGraph.captured = []
    monkeypatch.setattr(fd_compile, "capture_graph", lambda step, pool=None: StandInGraph(step, guard))
    real = api.resolve_execution
    monkeypatch.setattr(api, "resolve_execution", lambda cfg, model: real(
        cfg.replace(cuda_graph_stages="off"), model)._replace(cuda_graph_stages=cfg.cuda_graph_stages == "on"))
    steps = dict(drag_end_step=2) if method == "gooddrag" else dict(n_pix_step=4)
    kw = dict(method=method, **steps, **dict(QUICK, lora_steps=3), **extra)
    eager_ed, graphed_ed = fastdrag.Editor(tiny_model), fastdrag.Editor(tiny_model)
    eager = eager_ed.edit(image, FAR, cuda_graph_stages="off", **kw)
    assert captured == []
    graphed = graphed_ed.edit(image, FAR, cuda_graph_stages="on", **kw)  # fits and inverts again, graphed
    n_invert = round(graphed.config.inversion_strength * QUICK["n_inference_step"])
    # per graph: the first call of its mode runs eagerly (the warm-up), the second captures, then each replays
    replays = sorted(g.replays for g in captured)
    n_lora = 3
    if method == "dragdiffusion":  # LoRA; inversion; denoising with plain attention (steps 0-2), then mutual (3-)
        assert replays == sorted([n_lora - 1, n_invert - 1, 3 - 1, n_invert - 3 - 1]), replays
    else:  # LoRA; inversion; the mutual tail (AlDD's one-step denoises run eagerly: nothing to replay)
        n_tail = len(graphed.trace["mutual_timesteps"])
        assert replays == sorted([n_lora - 1, n_invert - 1, n_tail - 1]), replays
    (lora_eager,), (lora_graphed,) = eager_ed._loras.values(), graphed_ed._loras.values()
    assert lora_eager.keys() == lora_graphed.keys()
    for name in lora_eager:
        assert torch.equal(lora_graphed[name], lora_eager[name]), name
    assert any("lora_B" in n and lora_eager[n].abs().max() > 0 for n in lora_eager)  # the fit moved the adapter
    assert np.array_equal(_pixels(graphed), _pixels(eager))
    assert torch.equal(graphed.trace["handles"], eager.trace["handles"])


def test_host_read_guard_catches_a_host_read(tiny_model, image, stand_in_graph, monkeypatch):
    """The guard above is not vacuous: a tracking op that reads its result on the host fails the graph path."""
    import fastdrag.kernels as fast_ops

    real = fast_ops.track

    def track_with_a_sync(*args, **kwargs):
        out = real(*args, **kwargs)
        out.tolist()
        return out

    monkeypatch.setattr(fast_ops, "track", track_with_a_sync)
    StandInGraph.guard.roots += (os.path.abspath(__file__),)  # this file's track_with_a_sync stands for fastdrag's
    with pytest.raises(AssertionError, match="host read tolist"):
        fastdrag.Editor(tiny_model).edit(image, FAR, backend="fast", cuda_graph="on", n_pix_step=4, **QUICK)


def test_cuda_graph_switch_is_checked(tiny_model, image):
    for switch in ("cuda_graph", "cuda_graph_stages"):
        with pytest.raises(fastdrag.ConfigError, match=f"{switch}='on' needs a model on a CUDA device"):
            fastdrag.Editor(tiny_model).edit(image, REACH, n_pix_step=2, **QUICK, **{switch: "on"})
    with pytest.raises(fastdrag.ConfigError, match="not available for gooddrag"):
        fastdrag.make_config("gooddrag", cuda_graph="on")
    with pytest.raises(fastdrag.ConfigError, match="merge_lora must be"):
        fastdrag.make_config("dragdiffusion", merge_lora="yes")
    r = fastdrag.Editor(tiny_model).edit(image, REACH, n_pix_step=3, **QUICK)  # auto: off on the CPU
    assert r.trace["cuda_graph"] is False


def test_merge_lora_switch_runs_the_drag_on_merged_weights(tiny_model, image, monkeypatch):
    """merge_lora="on": the drag loop and the denoising never run the adapter branch, the result matches the
    unmerged run in fp32, and the adapter is back (unmerged, same weights) after the edit."""
    ed = fastdrag.Editor(tiny_model)
    kw = dict(n_pix_step=REACH_STEPS, **QUICK)
    plain = ed.edit(image, REACH, merge_lora="off", **kw)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for n, m in tiny_model.unet.named_modules()
             if n.endswith(f"lora_A.{ADAPTER}")]
    weights = {n: p.detach().clone() for n, p in tiny_model.unet.named_parameters()}
    try:
        merged = ed.edit(image, REACH, merge_lora="on", **kw)  # a second prepared state (inversion unmerged)
        inversion_calls = len(calls)
        calls.clear()
        again = ed.edit(image, REACH, merge_lora="on", **kw)  # cached: only the drag and the denoising run
        assert calls == []
        ed.edit(image, REACH, merge_lora="off", **kw)
        assert len(calls) > 0 and inversion_calls > 0  # the adapter is active again outside the merged block
    finally:
        for h in hooks:
            h.remove()
    for n, p in tiny_model.unet.named_parameters():
        assert torch.equal(p, weights[n]), n
    for r in (merged, again):
        assert torch.equal(r.trace["handles"], plain.trace["handles"])
        torch.testing.assert_close(r.trace["z_dragged"], plain.trace["z_dragged"], rtol=0, atol=1e-4)
        assert_images_close(plain, r)


# ----------------------------------------------------------------------------------------------------------
# 3. the latency benchmark script runs end to end (no timing asserts)


def test_latency_benchmark_smoke(capsys):
    """Both parts of the benchmark (each one device call on a GPU) run and print only their own sections."""
    import argparse

    from benchmarks import latency

    methods = ["dragdiffusion", "gooddrag", "dragtext", "clipdrag"]
    common = ["--model", "tiny", "--size", "128", "--steps", "3", "--lora-steps", "1", "--repeats", "1", "--smoke"]
    rc = latency.main(common + ["--part", "stages", "--methods", ",".join(methods), "--profile"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    for m in methods:
        rows = [ln for ln in lines if ln.startswith(m + " ")]
        assert len(rows) == 1 and "first edit" in rows[0] and "ms/step" in rows[0], (m, out)
    assert "# profile of one DragDiffusion re-drag" in out and "aten::" in out, out
    assert not [ln for ln in lines if ln.startswith("  ") and "ms/step" in ln], out  # no waterfall

    rc = latency.main(common + ["--part", "waterfall", "--profile"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    layers = [name for name, _ in latency.WATERFALL]
    waterfall = [ln.strip() for ln in lines if ln.startswith("  ") and "ms/step" in ln]
    assert waterfall and waterfall[0].startswith("reference fp32"), out
    assert all(any(w.startswith(name) for name in layers) for w in waterfall), out
    assert not any(ln.startswith(m + " ") for m in methods for ln in lines), out
    assert "# profile" not in out, out
    args = argparse.Namespace(part="waterfall", out="res")
    assert latency.result_path(args, "NVIDIA H100 80GB HBM3") == os.path.join("res",
                                                                             "latency-waterfall-NVIDIA_H100_80GB_HBM3.json")
