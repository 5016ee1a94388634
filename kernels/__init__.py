"""fastdrag.kernels: the hot-loop ops (patch sampling, tracking, gradient fusion).

Each public op has the signature of its plain-PyTorch reference in `reference.py` and is registered with
torch.library under the "fastdrag" namespace (torch.ops.fastdrag.*). It runs a Triton kernel when its
inputs are on a CUDA device (or under TRITON_INTERPRET=1) and the reference otherwise;
FASTDRAG_DISABLE_TRITON=1 forces the reference.

Note: the submodule `track.py` shares its name with the op; `fastdrag.kernels.track` is the function.
Reach the module with `importlib.import_module("fastdrag.kernels.track")`.
"""
if __name__ == "fastdrag.kernels":
    from . import reference
    from .fuse import fuse_gradients
    from .interp import patch_l1, sample_patches
    from .reference import upsample
    from .track import track

    __all__ = ["sample_patches", "patch_l1", "track", "fuse_gradients", "upsample"]
else:
    # Loaded by path as a top-level `kernels` (the checkout's root on sys.path, e.g. `python -m ...` from it):
    # transformers and diffusers import that name while probing for the Hugging Face `kernels` package. Stay
    # inert, so the ops are defined and registered once, by fastdrag.kernels.
    __all__ = []
