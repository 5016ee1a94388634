"""Latency of whole edits, per stage, and the fast-path waterfall, measured side by side in one run.

    python -m benchmarks.latency                       # CUDA: full SD-1.5 architecture, random weights, 512x512
    python -m benchmarks.latency --part stages --profile   # the per-method stages and the profile only
    python -m benchmarks.latency --part waterfall          # the waterfall only (each part fits one device call)
    python -m benchmarks.latency --model tiny --size 128 --steps 4 --smoke   # CPU: checks the script runs

The model is the SD-1.5 architecture with RANDOM weights (no checkpoints on the benchmark machines): the cost of
a pass does not depend on the weights' values, but drag trajectories do, so every configuration runs a fixed
number of drag steps (targets far away, early stop disabled) and the same inputs. Results: per-stage seconds
for each method, seconds per drag step, a re-drag with the prepared image cached, the waterfall
(reference fp32 -> +bf16 -> +compile -> +kernels & lazy upsample -> +LoRA merged -> +device stop flag -> +CUDA
graph of the drag step), analytic FLOPs per
drag step and achieved TFLOP/s, and peak memory. Written to <out>/latency[-<part>]-<device>.json after every
method and every waterfall layer ("complete": false until the end), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

import fastdrag

from .flops import drag_step_flops

METHOD_STEPS = {"dragdiffusion": "n_pix_step", "dragtext": "n_pix_step", "clipdrag": "n_pix_step"}

_OFF = dict(compile_unet="off", merge_lora="off", cuda_graph="off")
WATERFALL = [
    ("reference fp32", dict(_OFF, backend="reference", precision="fp32")),
    ("+ bf16", dict(_OFF, backend="reference", precision="bf16")),
    ("+ torch.compile", dict(_OFF, backend="reference", precision="bf16", compile_unet="on")),
    ("+ Triton ops, lazy upsample", dict(_OFF, backend="fast", precision="bf16", compile_unet="on")),
    ("+ LoRA merged", dict(_OFF, backend="fast", precision="bf16", compile_unet="on", merge_lora="on")),
    ("+ device stop flag (check every 10)", dict(backend="fast", precision="bf16", compile_unet="on",
                                                 merge_lora="on", cuda_graph="off", check_every=10)),
    ("+ CUDA graph of the drag step", dict(backend="fast", precision="bf16", compile_unet="on", merge_lora="on",
                                           cuda_graph="on", check_every=10)),
]


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def _image(size: int) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    low = torch.rand(1, 3, 8, 8, generator=g)
    img = torch.nn.functional.interpolate(low, (size, size), mode="bicubic", align_corners=False)[0]
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def result_path(args, device_name: str) -> str:
    name = device_name.replace(" ", "_").replace("/", "_")
    part = "" if args.part == "all" else f"-{args.part}"
    return os.path.join(args.out, f"latency{part}-{name}.json")


def _save(out: dict, args) -> None:
    """Write what has been measured so far (not in --smoke runs: CPU numbers are not results)."""
    if args.smoke:
        return
    os.makedirs(args.out, exist_ok=True)
    with open(result_path(args, out["device"]), "w") as f:
        json.dump(out, f, indent=2)


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = fastdrag.load_model(args.model, device=device)
    size = args.size
    image = _image(size)
    # far-apart points so no configuration stops early; stop_distance tiny so all run exactly `steps` steps
    points = [((size * 0.2, size * 0.3), (size * 0.8, size * 0.7)), ((size * 0.7, size * 0.2), (size * 0.3, size * 0.8))]
    common = dict(lora_steps=args.lora_steps, stop_distance=1e-3)
    cfg = dict(model.unet.config)
    lat = size // model.vae_scale
    # a no-mask drag step: the truncated UNet forward + the backward to the latent; tests/test_flops.py checks that
    # fastdrag's counted FLOPs (FlopCounterMode on the meta SD-1.5, benchmarks/flops.py) equal it within 1%
    flops = drag_step_flops(cfg, lat, lat, feature_idx=3, masked=False)
    out = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": _triton_version(), "diffusers": _version("diffusers"),
        "commit": _commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": f"{args.model} (random weights)", "image": f"{size}x{size}", "drag_steps": args.steps,
        "lora_steps": args.lora_steps, "flops_per_drag_step_tflop": flops / 1e12, "part": args.part,
        "complete": False, "methods": {}, "waterfall": [],
    }
    print(f"# fastdrag latency on {out['device']}: {args.model} with RANDOM weights, {size}x{size}, "
          f"{args.steps} drag steps, LoRA {args.lora_steps} steps; commit {out['commit']}")
    print(f"# drag step without a mask (UNet forward to up_blocks[2] + backward to the latent): {flops / 1e12:.3f} "
          f"TFLOP, counted = floor")

    # 1. per-stage times for each method on the default execution of this device, plus a cached re-drag
    for method in (args.methods if args.part in ("all", "stages") else []):
        ed = fastdrag.Editor(model)
        kw = dict(common)
        if method == "gooddrag":
            kw.update(drag_end_step=max(1, args.steps // 30), track_per_step=10, max_drag_per_track=3,
                      max_track_no_change=10 ** 6)
        else:
            kw[METHOD_STEPS[method]] = args.steps
        if method == "clipdrag":
            kw["clip_model"] = args.clip_model
            kw["edit_prompt"] = "a photo"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        first = ed.edit(image, points, method=method, **kw)  # includes compile warm-up
        again = ed.edit(image, points, method=method, **kw)  # re-drag: LoRA and inversion cached
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
        steps = max(1, again.trace.get("steps", args.steps))
        row = {"first_edit": first.timings, "redrag": again.timings, "drag_steps": steps,
               "per_drag_step_s": again.timings["drag"] / steps, "peak_memory_gib": peak}
        if method == "dragdiffusion":  # the others add a text backward, a CLIP pass or a reference trajectory
            row["achieved_tflops"] = flops / row["per_drag_step_s"] / 1e12
        out["methods"][method] = row
        t = again.timings
        print(f"{method:14s} first edit {first.timings['total']:7.2f}s (lora {first.timings['lora']:.2f}, invert "
              f"{first.timings['invert']:.2f}) | re-drag {t['total']:6.2f}s: drag {t['drag']:.2f}s "
              f"({row['per_drag_step_s'] * 1e3:.1f} ms/step), denoise {t['denoise']:.2f}s, decode {t['decode']:.2f}s"
              + (f" | peak {peak:.2f} GiB" if peak is not None else ""))
        _save(out, args)

    # 1a. the stages outside the drag loop with and without their CUDA graphs (LoRA fit, inversion, denoising)
    if device.type == "cuda" and "dragdiffusion" in out["methods"]:
        kw = dict(common, n_pix_step=args.steps)
        plain = fastdrag.Editor(model).edit(image, points, cuda_graph_stages="off", **kw).timings
        graphed = out["methods"]["dragdiffusion"]["first_edit"]
        out["stage_graphs"] = {"off": plain, "on": graphed}
        print("stage graphs (dragdiffusion first edit): " + ", ".join(
            f"{k} {plain[k]:.2f}s -> {graphed[k]:.2f}s" for k in ("lora", "invert", "denoise")))
        _save(out, args)

    # 1b. where a drag step's time goes: a profile of one DragDiffusion re-drag (prepared image cached)
    if args.profile and args.part in ("all", "stages"):
        out["profile"] = profile_redrag(model, image, points, dict(common, n_pix_step=args.steps), device)
        print(out["profile"])
        _save(out, args)

    # 2. the waterfall: DragDiffusion drag loop, each layer added, same inputs, same process
    if args.part in ("all", "waterfall"):
        base = None
        for name, layer in WATERFALL:
            if device.type != "cuda" and (layer.get("precision") != "fp32" or layer.get("compile_unet") == "on"):
                continue  # bf16, compile and graphs are GPU layers; on CPU only the op-level layers are shown
            ed = fastdrag.Editor(model)
            kw = dict(common, n_pix_step=args.steps, **layer)
            ed.edit(image, points, **kw)  # warm-up (compile, autotune, caches)
            times = []
            for _ in range(args.repeats):
                r = ed.edit(image, points, **kw)
                times.append(r.timings["drag"] / max(1, r.trace["steps"]))
            per_step = float(np.median(times))
            base = base or per_step
            out["waterfall"].append({"layer": name, "per_drag_step_s": per_step, "speedup": base / per_step,
                                     "tflops": flops / per_step / 1e12})
            print(f"  {name:38s} {per_step * 1e3:9.2f} ms/step  x{base / per_step:6.2f}  "
                  f"{flops / per_step / 1e12:7.1f} TFLOP/s")
            _save(out, args)
        model.to(dtype=torch.float32)
    return out


def profile_redrag(model, image, points, kw, device, rows: int = 30) -> str:
    """torch.profiler table of one DragDiffusion re-drag on the default execution, sorted by device time."""
    ed = fastdrag.Editor(model)
    ed.edit(image, points, **kw)  # prepare, compile, capture once
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        ed.edit(image, points, **kw)
        _sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return f"# profile of one DragDiffusion re-drag ({kw['n_pix_step']} drag steps), by {key}\n" + \
        prof.key_averages().table(sort_by=key, row_limit=rows)


def _version(name):
    try:
        return __import__(name).__version__
    except Exception:  # noqa: BLE001
        return None


def _triton_version():
    return _version("triton")


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """This benchmark's options (also `fastdrag bench latency`)."""
    ap.add_argument("--model", default="sd15-random", help='"sd15-random" (default), "tiny", or a diffusers folder')
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=80, help="drag steps per edit (fixed: early stop disabled)")
    ap.add_argument("--lora-steps", type=int, default=80)
    ap.add_argument("--methods", default="dragdiffusion,gooddrag,dragtext,clipdrag")
    ap.add_argument("--clip-model", default="tiny", help="CLIP for clipdrag (tiny = random, no download)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--part", choices=("all", "stages", "waterfall"), default="all",
                    help="stages: per-method stages, stage graphs and --profile; waterfall: the waterfall only")
    ap.add_argument("--profile", action="store_true", help="also profile one DragDiffusion re-drag (kernel table)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true", help="allow running on CPU (numbers are not meaningful)")
    return ap


def main(argv=None) -> int:
    args = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv)
    return run_main(args)


def run_main(args: argparse.Namespace) -> int:
    args.methods = [m for m in args.methods.split(",") if m]
    if not torch.cuda.is_available() and not args.smoke:
        print("benchmarks.latency: no CUDA device. GPU timings need a GPU; use --smoke to check the script on CPU.")
        return 0
    t0 = time.perf_counter()
    out = run(args)
    out["wall_s"] = time.perf_counter() - t0
    out["complete"] = True
    _save(out, args)
    if not args.smoke:
        print(f"wrote {result_path(args, out['device'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
