"""Shared plumbing for the Triton ops: when to use Triton, how to allocate outputs, launch helpers.

Dispatch rule (read at call time so a test or a user can flip the kill switch between calls):
- `FASTDRAG_DISABLE_TRITON=1` always takes the plain-PyTorch reference;
- otherwise Triton runs when every tensor argument is on a CUDA device, or when the Triton interpreter is
  on (`TRITON_INTERPRET=1`), in which case CPU tensors are fine;
- anything else (CPU without the interpreter, float64 maps, ...) takes the reference.

`TRITON_INTERPRET` is sampled once, at import: Triton reads it when the `@triton.jit` decorators run, so
flipping it later would leave us with compiled kernels that cannot launch on a CPU ("0 active drivers").

`FASTDRAG_POISON=1` makes every output that a kernel writes with plain stores start out as NaN (or the
most negative integer), so that an element a kernel forgets to write fails the comparison in the tests
instead of silently holding whatever the allocator returned.
"""

from __future__ import annotations

import contextlib
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Map dtypes the kernels are written for; everything else (float64, ...) goes to the reference so that
# the answer keeps the precision the caller asked for.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_disabled() -> bool:
    return os.environ.get("FASTDRAG_DISABLE_TRITON") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these (already validated) tensor arguments."""
    if triton_disabled():
        return False
    if INTERPRET:
        return True
    return all(t.is_cuda for t in tensors)


def poison_enabled() -> bool:
    return os.environ.get("FASTDRAG_POISON") == "1"


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output buffer that the kernel fully overwrites: empty, or poisoned under FASTDRAG_POISON=1."""
    if not poison_enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)


def device_ctx(t: torch.Tensor):
    """Triton launches on the *current* CUDA device; make it the tensors' one (no-op on CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def norm_out_size(feat: torch.Tensor, out_size) -> list[int] | None:
    """None when no upsample is needed (absent, or equal to the map size, as in the reference)."""
    if out_size is None:
        return None
    size = [int(s) for s in out_size]
    if len(size) != 2:
        raise ValueError(f"out_size must be (H2, W2), got {out_size!r}")
    if size == [int(feat.shape[-2]), int(feat.shape[-1])]:
        return None
    return size


def as_tuple(out_size: list[int] | None) -> tuple[int, int] | None:
    return None if out_size is None else (int(out_size[0]), int(out_size[1]))


def grid_size(feat: torch.Tensor, out_size: list[int] | None) -> tuple[int, int]:
    """(H2, W2): the size of the grid the coordinates live on."""
    if out_size is None:
        return int(feat.shape[-2]), int(feat.shape[-1])
    return int(out_size[0]), int(out_size[1])


__all__ = [
    "INTERPRET", "KERNEL_DTYPES", "triton_disabled", "use_triton", "poison_enabled", "new_output",
    "device_ctx", "next_pow2", "cdiv", "norm_out_size", "as_tuple", "grid_size",
]
