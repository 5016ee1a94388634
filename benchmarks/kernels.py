"""Benchmark of the fastdrag kernels against their plain-PyTorch references at real sizes.

    python -m benchmarks.kernels [--out DIR] [--dtype bf16|fp32] [--rep MS] [--sweep-tiles]

Real sizes: SD-1.5 up-block features C = 640 on a 64x64 map upsampled to 256x256 (DragDiffusion's
feature resize), N = 1 and 10 handles, patch radius 1 and 4, tracking radius 3 and 12, and a 4x64x64
latent gradient for the fusion.

For each op and case it reports the median time of the Triton op and of the reference, eager (each call
launched from Python, as the pipeline runs today) and replayed from a CUDA graph (device time without
launch overhead), the speed-up, and the achieved bandwidth on the op's *compulsory* bytes against the
device's measured copy bandwidth. Compulsory bytes are what any implementation must move:
- sample_patches: the source pixels the patches touch (the "footprint", all channels) + the output;
- patch_l1: footprint + reference patches + the [N] loss; backward: + the dense [C, h, w] gradient;
- sample_patches backward: upstream grad + the dense [C, h, w] gradient;
- track: window footprint + ref features + the [N, 2] result;
- fuse_gradients: both gradients once + the output.
The dense gradient of the backward ops is written in full (it is a [C, h, w] tensor, mostly zeros).

Every case is first checked against the reference (values, or exact equality for tracking); a mismatch
aborts the run rather than reporting a number for a wrong kernel.

--sweep-tiles also times the patch and tracking ops at other tile sizes (elements per program: the patch
kernels' _TILE_ELEMS, whose upsampled backward takes half; the tracking pass's _TRACK_TILE_ELEMS, halved on the
upsampled map), so that the defaults, chosen from compiler output without a GPU (benchmarks/compile_sm90.py),
can be set from timings.

Results are printed and, on a GPU, written as JSON to --out (default benchmarks/results/). Without a GPU
the script says so and exits 0: under TRITON_INTERPRET the kernels run in a Python interpreter, so CPU
timings say nothing about them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

C, H, W, H2, W2 = 640, 64, 64, 256, 256
DEVICE = "cuda"
OUT_SIZE = (H2, W2)


# ----------------------------------------------------------------------------------------------------
# bytes model
# ----------------------------------------------------------------------------------------------------

def _src_taps(coords: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """Source indices touched when sampling the n_in -> n_out bilinear upsample at fractional coords."""
    p = coords.clamp(0, n_out - 1)
    i0 = p.floor().long()
    i1 = (i0 + 1).clamp(max=n_out - 1)
    out = []
    for i in (i0, i1):
        src = ((i.double() + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
        s0 = src.floor().long().clamp(max=n_in - 1)
        out += [s0, (s0 + 1).clamp(max=n_in - 1)]
    return torch.stack(out, -1)


def footprint_pixels(centers: torch.Tensor, radius: int, integer_points: bool = False) -> int:
    """Distinct source pixels read by patches (or windows) of `radius` around `centers` (all points).

    integer_points: the window points are integers (tracking), so only the upsample's own 2 taps per axis
    are read, not the 2 x 2 of a bilinear sample between upsampled points.
    """
    offs = torch.arange(-radius, radius + 1, dtype=torch.float64)
    pix = set()
    for cy, cx in centers.double().cpu().tolist():
        ry, rx = _src_taps(cy + offs, H, H2), _src_taps(cx + offs, W, W2)
        if integer_points:
            ry, rx = ry[:, :2], rx[:, :2]
        rows, cols = set(ry.flatten().tolist()), set(rx.flatten().tolist())
        pix.update((r, c) for r in rows for c in cols)
    return len(pix)


# ----------------------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------------------

def _bench(fn, rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median"))


def _bench_graph(fn, rep_ms: int) -> float | None:
    """Median ms per call replayed from a CUDA graph; None if the function cannot be captured."""
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    except Exception as exc:  # report, do not guess
        print(f"    (CUDA graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        return None


def copy_bandwidth_gbps(rep_ms: int) -> float:
    """Device-to-device copy of 512 MiB: (read + write) bytes / time."""
    n = (512 << 20) // 4
    x = torch.empty(n, device="cuda")
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x), rep_ms)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


# ----------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------

def _inputs(n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    feat = torch.randn(C, H, W, device=DEVICE, generator=g).to(dtype)
    # Handles spread over the map, a few near the border; fractional centers for the shifted patches.
    handles = (torch.rand(n, 2, device=DEVICE, generator=g) * (H2 - 1)).round()
    centers = handles + torch.rand(n, 2, device=DEVICE, generator=g) * 2 - 1
    targets = (torch.rand(n, 2, device=DEVICE, generator=g) * (H2 - 1)).round()
    return feat, handles, centers, targets


def _check_close(a, b, what, atol, rtol):
    try:
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)
    except AssertionError as exc:
        raise SystemExit(f"{what}: kernel disagrees with the reference, not benchmarking it:\n{exc}")


def _check_track(got, exp, feat, f0, rtol, what):
    """Same points, or (a near-tie, from an ulp of difference in the upsample) points at the same distance."""
    from fastdrag.kernels import reference as R

    bad = (~(got == exp).all(1)).nonzero().flatten().tolist()
    if not bad:
        return
    fmap = R.upsample(feat, OUT_SIZE).float()
    for i in bad:
        d = [float((f0[i].float() - fmap[:, int(p[i, 0]), int(p[i, 1])]).abs().sum()) for p in (got, exp)]
        if abs(d[0] - d[1]) > rtol * abs(d[1]):
            raise SystemExit(f"{what}: kernel disagrees with the reference at point {i} ({got[i].tolist()} "
                             f"at distance {d[0]} vs {exp[i].tolist()} at {d[1]}), not benchmarking it")


def build_cases(dtype: torch.dtype):
    """Yields (op, case, triton_fn, reference_fn, compulsory_bytes)."""
    import fastdrag.kernels as K
    from fastdrag.kernels import reference as R

    es = torch.finfo(dtype).bits // 8
    tol = (2e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    grad_bytes = C * H * W * es

    for n in (1, 10):
        feat, handles, centers, targets = _inputs(n, dtype, seed=n)
        for r in (1, 4):
            k2 = (2 * r + 1) ** 2
            fp = footprint_pixels(centers, r) * C * es
            case = f"N={n} r={r}"
            _check_close(K.sample_patches(feat, centers, r, out_size=OUT_SIZE),
                         R.sample_patches(feat.float(), centers, r, out_size=OUT_SIZE), f"sample_patches {case}", *tol)
            yield ("sample_patches", case,
                   lambda f=feat, c=centers, r=r: K.sample_patches(f, c, r, out_size=OUT_SIZE),
                   lambda f=feat, c=centers, r=r: R.sample_patches(f, c, r, out_size=OUT_SIZE),
                   fp + n * C * k2 * es)

            # sample_patches backward alone (upstream grad given); checked against the fp32 reference
            fr = feat.clone().requires_grad_()
            f32 = feat.float().requires_grad_()
            out_t = K.sample_patches(fr, centers, r, out_size=OUT_SIZE)
            out_r = R.sample_patches(fr, centers, r, out_size=OUT_SIZE)
            gup = torch.randn_like(out_t)
            _check_close(torch.autograd.grad(out_t, fr, gup, retain_graph=True)[0],
                         torch.autograd.grad(R.sample_patches(f32, centers, r, out_size=OUT_SIZE), f32,
                                             gup.float())[0],
                         f"sample_patches bwd {case}", 1e-4 if dtype == torch.float32 else tol[0], tol[1])
            yield ("sample_patches.backward", case,
                   lambda o=out_t, f=fr, g=gup: torch.autograd.grad(o, f, g, retain_graph=True),
                   lambda o=out_r, f=fr, g=gup: torch.autograd.grad(o, f, g, retain_graph=True),
                   n * C * k2 * es + grad_bytes)

            # patch_l1: forward, and forward + backward as in the motion-supervision step
            ref = R.sample_patches(feat.float(), handles, r, out_size=OUT_SIZE).to(dtype)
            _check_close(K.patch_l1(feat, ref, centers, r, out_size=OUT_SIZE),
                         R.patch_l1(feat.float(), ref, centers, r, out_size=OUT_SIZE), f"patch_l1 {case}", *tol)
            l1_bytes = fp + n * C * k2 * es + n * 4
            yield ("patch_l1", case,
                   lambda f=feat, ref=ref, c=centers, r=r: K.patch_l1(f, ref, c, r, out_size=OUT_SIZE),
                   lambda f=feat, ref=ref, c=centers, r=r: R.patch_l1(f, ref, c, r, out_size=OUT_SIZE),
                   l1_bytes)

            def fb(op, f=fr, ref=ref, c=centers, r=r):
                return torch.autograd.grad(op(f, ref, c, r, out_size=OUT_SIZE).sum(), f)

            yield ("patch_l1.fwd+bwd", case, lambda fb=fb: fb(K.patch_l1), lambda fb=fb: fb(R.patch_l1),
                   l1_bytes + grad_bytes)

        f0 = R.sample_patches(feat.float(), handles, 0, out_size=OUT_SIZE)[:, :, 0, 0]
        moved = (handles + torch.randint(-2, 3, handles.shape, device=DEVICE)).clamp(0, H2 - 1)
        for r in (3, 12):
            for closer in (False, True):
                case = f"N={n} r={r}" + (" closer" if closer else "")
                got = K.track(feat, f0, moved, targets, r, out_size=OUT_SIZE, closer_only=closer)
                exp = R.track(feat, f0, moved, targets, r, out_size=OUT_SIZE, closer_only=closer)
                _check_track(got, exp, feat, f0, tol[1], f"track {case}")
                yield ("track", case,
                       lambda f=feat, a=f0, h=moved, t=targets, r=r, co=closer:
                       K.track(f, a, h, t, r, out_size=OUT_SIZE, closer_only=co),
                       lambda f=feat, a=f0, h=moved, t=targets, r=r, co=closer:
                       R.track(f, a, h, t, r, out_size=OUT_SIZE, closer_only=co),
                       footprint_pixels(moved, r, integer_points=True) * C * es + n * C * 4 + n * 2 * 4)

    g = torch.Generator(device=DEVICE).manual_seed(99)
    gl = torch.randn(4, 64, 64, device=DEVICE, generator=g)
    gg = torch.randn(4, 64, 64, device=DEVICE, generator=g)
    for rule in ("clipdrag", "projection"):
        _check_close(K.fuse_gradients(gl, gg, 0.1, rule=rule), R.fuse_gradients(gl, gg, 0.1, rule=rule),
                     f"fuse {rule}", 2e-5, 1e-5)
        yield ("fuse_gradients", f"4x64x64 fp32 {rule}",
               lambda rule=rule: K.fuse_gradients(gl, gg, 0.1, rule=rule),
               lambda rule=rule: R.fuse_gradients(gl, gg, 0.1, rule=rule),
               3 * gl.numel() * 4)


# ----------------------------------------------------------------------------------------------------
# tile sweep
# ----------------------------------------------------------------------------------------------------

TILE_SWEEP = {"patch": ("interp", "_TILE_ELEMS", (256, 512, 1024, 2048)),
              "track": ("track", "_TRACK_TILE_ELEMS", (512, 1024, 2048, 4096))}


def _flat(out) -> torch.Tensor:
    parts = out if isinstance(out, (tuple, list)) else (out,)
    return torch.cat([p.detach().float().flatten() for p in parts])


def sweep_tiles(cases, rep_ms: int) -> list[dict]:
    """Time each patch / tracking case's Triton op at every tile size of TILE_SWEEP (the module constant is set
    for the call and put back). Each row records how far the output moved from the default tile's (channel
    blocks are summed in another order: rounding for the patches, possibly a near-tie for tracking)."""
    rows = []
    for op, case, fn_t, _, _ in cases:
        if op.startswith("fuse"):
            continue
        mod_name, knob, values = TILE_SWEEP["track" if op == "track" else "patch"]
        mod = importlib.import_module(f"fastdrag.kernels.{mod_name}")
        default = getattr(mod, knob)
        base = _flat(fn_t())
        mine = []
        for value in values:
            setattr(mod, knob, value)
            try:
                moved = float((_flat(fn_t()) - base).abs().max())
                t_ms, tg_ms = _bench(fn_t, rep_ms), _bench_graph(fn_t, rep_ms)
            finally:
                setattr(mod, knob, default)
            mine.append(dict(op=op, case=case, knob=knob, value=value, default=value == default, triton_ms=t_ms,
                             triton_graph_ms=tg_ms, max_abs_diff_vs_default=moved))
        best = min(mine, key=lambda r: r["triton_graph_ms"] or r["triton_ms"])
        print(f"{op:<24} {case:<16} " + "  ".join(
            f"{r['value']:>5}: {r['triton_ms']:.4f}/{r['triton_graph_ms'] or float('nan'):.4f}"
            + ("*" if r is best else " ") + ("d" if r["default"] else " ") for r in mine))
        rows += mine
    return rows


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

def gpu_timing_available() -> bool:
    """Kernels run compiled on a CUDA device (not in the interpreter), so their timings mean something."""
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def _cpu_notice() -> int:
    print("benchmarks.kernels: no CUDA device. The Triton kernels only run on a GPU (or, for testing, in\n"
          "the TRITON_INTERPRET=1 Python interpreter, whose timings say nothing about the kernels), so\n"
          "there is nothing meaningful to time here. Run this on a GPU machine; correctness on CPU is\n"
          "covered by `TRITON_INTERPRET=1 pytest tests/test_kernels.py`.")
    return 0


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """This benchmark's options (also `fastdrag bench kernels`)."""
    ap.add_argument("--out", default=None, help="directory for the JSON results (default: benchmarks/results)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="feature map dtype")
    ap.add_argument("--rep", type=int, default=100, help="target measuring time per timing, ms")
    ap.add_argument("--sweep-tiles", action="store_true", help="also time the patch/tracking ops at other tiles")
    return ap


def main(argv=None) -> int:
    args = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv)
    return run_main(args)


def run_main(args: argparse.Namespace) -> int:
    if not gpu_timing_available():
        return _cpu_notice()
    if os.environ.get("FASTDRAG_DISABLE_TRITON") == "1":
        print("FASTDRAG_DISABLE_TRITON=1 is set: the ops would run the reference; unset it to benchmark.")
        return 1
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]

    import triton

    dev = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth_gbps(args.rep)
    print(f"{dev} | torch {torch.__version__} | triton {triton.__version__} | feat dtype {args.dtype}")
    print(f"measured copy bandwidth: {copy_bw:.0f} GB/s (512 MiB device-to-device, read + write)\n")
    hdr = (f"{'op':<24} {'case':<16} {'triton ms':>10} {'ref ms':>9} {'speedup':>8} {'GB/s':>7} {'%copy':>6}"
           f" | {'graph: triton ms':>16} {'ref ms':>9} {'speedup':>8}")
    print(hdr)
    print("-" * len(hdr))

    rows = []
    cases = list(build_cases(dtype))
    for op, case, fn_t, fn_r, nbytes in cases:
        t_ms, r_ms = _bench(fn_t, args.rep), _bench(fn_r, args.rep)
        tg_ms, rg_ms = _bench_graph(fn_t, args.rep), _bench_graph(fn_r, args.rep)
        gbps = nbytes / (t_ms * 1e-3) / 1e9
        row = dict(op=op, case=case, triton_ms=t_ms, reference_ms=r_ms, speedup=r_ms / t_ms,
                   triton_graph_ms=tg_ms, reference_graph_ms=rg_ms,
                   graph_speedup=(rg_ms / tg_ms) if (tg_ms and rg_ms) else None,
                   compulsory_bytes=nbytes, achieved_GBps=gbps, pct_of_copy_bw=100 * gbps / copy_bw)
        rows.append(row)
        g = (f"{tg_ms:16.4f} {rg_ms:9.4f} {rg_ms / tg_ms:7.1f}x" if (tg_ms and rg_ms) else f"{'n/a':>16}")
        print(f"{op:<24} {case:<16} {t_ms:10.4f} {r_ms:9.4f} {r_ms / t_ms:7.1f}x {gbps:7.1f} "
              f"{100 * gbps / copy_bw:5.1f}% | {g}")

    below = [f"{r['op']} [{r['case']}]" for r in rows if r["speedup"] < 3]
    print(f"\ntarget >= 3x over the reference (eager): {'met' if not below else 'NOT met for ' + ', '.join(below)}")
    sweep = None
    if args.sweep_tiles:
        print("\ntile sweep, per tile size (elements): eager ms / graph ms; * fastest by graph time, d the default")
        sweep = sweep_tiles(cases, args.rep)

    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    slug = "".join(ch if ch.isalnum() else "-" for ch in dev).strip("-").lower()
    path = out_dir / f"kernels-{slug}-{args.dtype}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(dict(
        device=dev, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        python=platform.python_version(), git_commit=_git_commit(), date=now.isoformat(),
        feat_dtype=args.dtype, sizes=dict(C=C, map=[H, W], out_size=[H2, W2]),
        copy_bandwidth_GBps=copy_bw, timing="triton.testing.do_bench median (eager) and "
        "do_bench_cudagraph median (graph), ms per call", results=rows, tile_sweep=sweep), indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
