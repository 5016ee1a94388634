"""Image fidelity IF = 1 - LPIPS, as DragBench's drag_bench_evaluation/run_eval_similarity.py
(github.com/Yujun-Shi/DragDiffusion, commit 18eb668) computes it with `lpips.LPIPS(net='alex')`:

  both images in [-1, 1] (x / 127.5 - 1), the edit first resized to the source size (PIL bilinear), both resized
  to 224x224 (F.interpolate bilinear, align_corners=False), then LPIPS v0.1 (Zhang et al., CVPR'18,
  github.com/richzhang/PerceptualSimilarity): the scaling layer (x - shift) / scale, AlexNet's five ReLU outputs,
  each unit-normalised over channels (x / (||x|| + 1e-10)), squared difference, the v0.1 1x1 linear layer (no
  bias), spatial mean, summed over the five layers.

The lpips package needs torchvision, which cannot sit beside this CPU torch, so AlexNet's feature layers and the
LPIPS head are written here and load the published weight files: the LPIPS v0.1 linear weights (`alex.pth`, the
same bytes in the lpips package, lpips/weights/v0.1/, and in the torchmetrics wheel,
torchmetrics/functional/image/lpips_models/ -- found there when torchmetrics is installed) and torchvision's
AlexNet state dict (`alexnet-owt-7be5be79.pth`, download.pytorch.org/models/), given as a path.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ConfigError, ModelLoadError

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision alexnet.features: (index, in, out, kernel, stride, padding); ReLU after each; max-pool (3, 2) after
# the first two and the last. LPIPS taps the ReLUs after convs 0, 3, 6, 8, 10.
ALEX_CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1),
              (10, 256, 256, 3, 1, 1))
CHANNELS = tuple(c[2] for c in ALEX_CONVS)


def torchmetrics_lpips_weights() -> str | None:
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], "functional", "image", "lpips_models", "alex.pth")
    return p if os.path.isfile(p) else None


def _load(path: str, what: str) -> dict:
    if not path or not os.path.isfile(path):
        raise ModelLoadError(f"{what}: no file {path!r}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{what}: {path!r} is not a torch state dict: {e}") from e
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{what}: {path!r} holds a {type(sd).__name__}, expected a state dict")
    return sd


class LPIPSAlex(torch.nn.Module):
    """AlexNet features + LPIPS v0.1 head. forward(x0, x1) on [-1, 1] Bx3xHxW -> B distances."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(i, o, k, s, p) for _, i, o, k, s, p in ALEX_CONVS)
        self.lins = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))

    def load_published(self, alexnet_path: str, lpips_path: str) -> "LPIPSAlex":
        alex = _load(alexnet_path, "AlexNet weights")
        lin = _load(lpips_path, "LPIPS v0.1 linear weights")
        for conv, (idx, i, o, k, _, _) in zip(self.convs, ALEX_CONVS):
            for part in ("weight", "bias"):
                key = f"features.{idx}.{part}"
                if key not in alex:
                    raise ModelLoadError(f"AlexNet weights {alexnet_path!r}: no {key!r} (expected torchvision's "
                                         f"alexnet state dict)")
                getattr(conv, part).data.copy_(self._shaped(alex[key], getattr(conv, part), alexnet_path, key))
        for j, l in enumerate(self.lins):
            key = f"lin{j}.model.1.weight"
            if key not in lin:
                raise ModelLoadError(f"LPIPS weights {lpips_path!r}: no {key!r} (expected lpips v0.1 alex.pth)")
            l.weight.data.copy_(self._shaped(lin[key], l.weight, lpips_path, key))
        return self

    @staticmethod
    def _shaped(t, param, path, key):
        if tuple(t.shape) != tuple(param.shape):
            raise ModelLoadError(f"{path!r}: {key} has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
        return t

    def features(self, x: torch.Tensor) -> list:
        x = (x - self.shift) / self.scale
        out = []
        for j, conv in enumerate(self.convs):
            if j in (1, 2):  # max-pool after the ReLUs of convs 0 and 3
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(conv(x))
            out.append(x)
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        total = 0
        for f0, f1, lin in zip(self.features(x0), self.features(x1), self.lins):
            f0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            f1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((f0 - f1) ** 2).mean((2, 3))
        return total.view(-1)


def to_pm1(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).float().div(127.5).sub(1).permute(2, 0, 1)[None]


def resize_to_source(edited, size):
    """The edit resized to the source size, PIL bilinear, as the official scripts (a no-op when equal)."""
    from PIL import Image

    return edited if edited.size == size else edited.resize(size, Image.BILINEAR)


class LPIPSMetric:
    name = "lpips"

    def __init__(self, lpips_weights: str | None = None, alexnet_weights: str | None = None, net=None):
        self.lpips_weights = lpips_weights or torchmetrics_lpips_weights()
        self.alexnet_weights = alexnet_weights
        self.net = net
        if net is None and (self.lpips_weights is None or alexnet_weights is None):
            raise ConfigError("the lpips metric needs --alexnet-weights (torchvision's alexnet-owt-7be5be79.pth) and "
                              "--lpips-weights (LPIPS v0.1 alex.pth; found by itself when torchmetrics is installed)")

    def config(self) -> dict:
        return {"lpips_weights": self.lpips_weights and os.path.abspath(self.lpips_weights),
                "alexnet_weights": self.alexnet_weights and os.path.abspath(self.alexnet_weights),
                "net": "alex", "version": "0.1", "size": 224}

    def setup(self, device=None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.net is None:
            self.net = LPIPSAlex().load_published(self.alexnet_weights, self.lpips_weights)
        self.net = self.net.eval().to(self.device)

    @torch.no_grad()
    def distance(self, source: np.ndarray, edited) -> float:
        edited = np.array(resize_to_source(edited.convert("RGB"), (source.shape[1], source.shape[0])))
        a = F.interpolate(to_pm1(source).to(self.device), (224, 224), mode="bilinear")
        b = F.interpolate(to_pm1(edited).to(self.device), (224, 224), mode="bilinear")
        return float(self.net(a, b).item())

    def score(self, sample, edited, record) -> dict:
        d = self.distance(sample.image, edited)
        return {"lpips": d, "if": 1.0 - d}
