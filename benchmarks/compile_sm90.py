"""Compile every Triton launch of the fastdrag ops for Hopper (sm_90), on any machine: no GPU needed.

The kernel tests run under the Triton interpreter (TRITON_INTERPRET=1), which executes a kernel's Python and
never meets the compiler: a kernel that the interpreter runs can still fail to build for the GPU (an arange
whose length is not a power of two, an op the backend lacks for a dtype, a block too big for shared memory),
and a kernel that builds can still spill registers. This script closes that gap without a GPU:

1. dispatch is forced to Triton on CPU tensors, and each kernel launch is recorded instead of run;
2. the public ops are driven, forward and backward, in fp32 / bf16 / fp16, at the benchmark sizes
   (C = 640, 64x64 map upsampled to 256x256, N = 1 and 10, patch radius 1 and 4, tracking radius 3 and 12,
   a 4x64x64 gradient, the methods' defaults) and at a small odd shape like the tests' ones;
3. each distinct launch (kernel, argument types, constexprs, num_warps) is compiled with Triton's own
   toolchain (ptxas ships in the triton wheel) for GPUTarget("cuda", 90, 32), the H100 / H200;
4. ptxas -v on the generated PTX gives registers per thread and spill bytes; Triton gives shared memory.

    python -m benchmarks.compile_sm90                 # table; exit status 1 if any launch fails
    python -m benchmarks.compile_sm90 --json F.json   # also write the table as JSON

Only compilation is checked here: the values are checked by the tests (interpreter) and on a lent GPU.
"""

from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    # Triton reads the variable when the @triton.jit decorators run: the kernels must be real JIT functions.
    os.environ["TRITON_INTERPRET"] = "0"

import argparse
import datetime as _dt
import importlib
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)
PTXAS_ARCH = "sm_90a"              # what Triton's NVIDIA backend passes ptxas for capability 90
MAX_SHARED = 227 * 1024            # H100 / H200: opt-in shared memory per block
MAX_REGS = 255

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
        torch.int64: "*i64", torch.int32: "*i32", torch.uint8: "*u8", torch.bool: "*i1"}
_OPS_MODULES = ("interp", "track", "fuse")


# ----------------------------------------------------------------------------------------------------
# recording launches
# ----------------------------------------------------------------------------------------------------

class Launch:
    """One distinct kernel instantiation: what Triton would compile for it on a GPU."""

    def __init__(self, fn: JITFunction, signature: dict, constexprs: dict, options: dict):
        self.fn, self.signature, self.constexprs, self.options = fn, signature, constexprs, options

    @property
    def name(self) -> str:
        return self.fn.__name__

    def key(self):
        return (self.name, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.options.items())))

    def describe(self) -> str:
        ptrs = sorted({s for s in self.signature.values() if s.startswith("*") and s != "*fp32"})
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs.items() if v is not None)
        return f"{self.name}[{','.join(ptrs) or 'fp32'}] {consts} warps={self.options.get('num_warps', 4)}"


def _arg_type(v) -> str:
    if isinstance(v, torch.Tensor):
        if v.dtype not in _PTR:
            raise TypeError(f"no Triton pointer type for a {v.dtype} tensor")
        return _PTR[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument of type {type(v).__name__}")


def record_launches(drive) -> list[Launch]:
    """Run `drive()` with Triton dispatch forced on CPU tensors and every launch recorded, not executed."""
    mods = [importlib.import_module(f"fastdrag.kernels.{m}") for m in _OPS_MODULES]
    if importlib.import_module("fastdrag.kernels._dispatch").INTERPRET:
        # the kernels were built as interpreter functions: nothing would reach JITFunction.run
        raise RuntimeError("record_launches needs the kernels built in compiled mode: run it in a process "
                           "started without TRITON_INTERPRET=1 (python -m benchmarks.compile_sm90 does that)")
    seen: dict = {}

    def run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
        sig, const = {}, {}
        for p in self.params:
            v = bound[p.name]
            if p.is_constexpr or v is None:
                sig[p.name], const[p.name] = "constexpr", v
            else:
                sig[p.name] = _arg_type(v)
        launch = Launch(self, sig, const, options)
        seen.setdefault(launch.key(), launch)

    saved_run = JITFunction.run
    saved_use = [m.use_triton for m in mods]
    JITFunction.run = run
    for m in mods:
        m.use_triton = lambda *tensors: True
    try:
        drive()
    finally:
        JITFunction.run = saved_run
        for m, u in zip(mods, saved_use):
            m.use_triton = u
    return list(seen.values())


def drive_ops() -> None:
    """Call every public op the way the pipeline and the benchmark do (outputs are garbage: nothing runs)."""
    from fastdrag import kernels as K

    g = torch.Generator().manual_seed(0)
    # (C, h, w, out_size): the benchmark's SD-1.5 size, and a small odd one like the tests'
    shapes = [(640, 64, 64, (256, 256)), (5, 7, 9, None), (5, 7, 9, (15, 19))]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for C, h, w, out_size in shapes:
            H2, W2 = out_size or (h, w)
            feat = torch.randn(C, h, w, generator=g).to(dtype)
            for n in (1, 10):
                centers = torch.rand(n, 2, generator=g) * torch.tensor([H2 - 1.0, W2 - 1.0])
                for r in (1, 4):
                    f = feat.clone().requires_grad_()
                    K.sample_patches(f, centers, r, out_size=out_size).float().sum().backward()
                    ref = torch.randn(n, C, 2 * r + 1, 2 * r + 1, generator=g).to(dtype)
                    f = feat.clone().requires_grad_()
                    K.patch_l1(f, ref, centers, r, out_size=out_size).sum().backward()
                for r in (3, 12):
                    for closer in (False, True):
                        K.track(feat, torch.randn(n, C, generator=g), centers.round(), centers, r,
                                out_size=out_size, closer_only=closer)
        for shape in ((4, 64, 64), (3, 5, 7), (1 << 20,)):  # the single-program and the two-kernel layouts
            for rule in ("clipdrag", "projection"):
                K.fuse_gradients(torch.randn(shape, generator=g).to(dtype),
                                 torch.randn(shape, generator=g).to(dtype), 0.1, rule=rule)


# ----------------------------------------------------------------------------------------------------
# compiling
# ----------------------------------------------------------------------------------------------------

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def resource_usage(ptx: str) -> dict:
    """Registers per thread and spill bytes, from `ptxas -v` on the PTX that Triton generated."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(_ptxas()), "-v", f"--gpu-name={PTXAS_ARCH}", str(src), "-o",
                              str(Path(d) / "k.cubin")], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-2000:]}")
    regs = _PTXAS_USED.search(res.stderr)
    spill = _PTXAS_SPILL.search(res.stderr)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None}


def compile_launch(launch: Launch) -> dict:
    row = {"kernel": launch.describe(), "name": launch.name,
           "signature": {k: v for k, v in launch.signature.items() if v != "constexpr"},
           "constexprs": dict(launch.constexprs), "options": launch.options}
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(launch.fn, launch.signature, launch.constexprs), target=TARGET,
                           options=dict(launch.options))
        row.update(ok=True, shared=int(k.metadata.shared), **resource_usage(k.asm["ptx"]))
    except Exception as e:  # noqa: BLE001 - reported per launch, the script's exit status says it failed
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip()[-3000:]}")
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def problems(row: dict) -> list[str]:
    """What makes a compiled launch unacceptable on an H100: a failed build, too much shared memory or
    too many registers (a launch failure), or register spills (local-memory traffic in the hot loop)."""
    if not row["ok"]:
        return ["does not compile"]
    out = []
    if row["shared"] > MAX_SHARED:
        out.append(f"{row['shared']} B shared memory > {MAX_SHARED}")
    if row["registers"] is not None and row["registers"] > MAX_REGS:
        out.append(f"{row['registers']} registers > {MAX_REGS}")
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills ({row['spill_stores']} B stored, {row['spill_loads']} B loaded)")
    return out


def run(drive=drive_ops) -> list[dict]:
    launches = sorted(record_launches(drive), key=lambda launch: launch.describe())
    rows = [compile_launch(launch) for launch in launches]
    for row in rows:
        row["problems"] = problems(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the rows as JSON to this file")
    args = ap.parse_args(argv)
    print(f"Compiling the fastdrag kernel launches for {TARGET.backend} sm_{TARGET.arch} "
          f"(triton {triton.__version__}, torch {torch.__version__}); nothing is run.", flush=True)
    rows = run()
    bad = 0
    for row in rows:
        issues = row["problems"]
        bad += bool(issues)
        stats = (f"regs {row['registers']:>3}  spill {row['spill_stores']}/{row['spill_loads']} B  "
                 f"smem {row['shared']:>5} B" if row["ok"] else row["error"].splitlines()[0][:120])
        print(f"{'FAIL' if issues else 'ok  '}  {row['kernel']:<78} {stats}  {'; '.join(issues)}")
    print(f"{len(rows)} launches, {bad} with problems")
    if args.json:
        from .kernels import _git_commit

        meta = {"what": "static compile report: nothing was run, no GPU was used",
                "target": f"cuda sm_{TARGET.arch} ({PTXAS_ARCH})", "triton": triton.__version__,
                "torch": torch.__version__, "python": platform.python_version(), "git_commit": _git_commit(),
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        args.json.write_text(json.dumps({**meta, "launches": len(rows), "with_problems": bad, "rows": rows},
                                        indent=1) + "\n")
    for row in rows:
        if not row["ok"]:
            print(f"\n{row['kernel']}:\n{row['error']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
