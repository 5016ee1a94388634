"""Drag Accuracy Index (DAI), GoodDrag (Zhang et al., ICLR'25), evaluation/compute_DAI.py at
github.com/zewei-Zhang/GoodDrag (commit 3015cff).

Images as [0, 1] RGB floats (torchvision ToTensor). For each (handle, target) pair the patch of radius r around the
handle in the original image and the patch around the target in the result; their squared difference summed over
the patch and the channels. The official code then divides by the number of pairs, by the patch area (2r+1)^2, and
by the number of pairs again:

    dai_official_r = sum_pairs(d) / N / (2r+1)^2 / N        (the paper's numbers: comparable with them)
    dai_per_pair_r = sum_pairs(d) / N / (2r+1)^2            (the mean over pairs the text describes)

Both are reported, named. Radii 1, 5, 10, 20 as the official script. Where the official slice
`image[y-r:y+r+1, x-r:x+r+1]` would leave the image (a negative start wraps, an end past the border is cut short),
this is an error naming the point, not a silently different patch.
"""

from __future__ import annotations

import numpy as np

from ...errors import InvalidInputError

RADII = (1, 5, 10, 20)


def _patch(img: np.ndarray, center, r: int, what: str) -> np.ndarray:
    x, y = center
    if float(x) != int(x) or float(y) != int(y):
        raise InvalidInputError(f"DAI: {what} point ({x}, {y}) is not on a pixel; the official patches are integer")
    x, y = int(x), int(y)
    h, w = img.shape[:2]
    if x - r < 0 or y - r < 0 or x + r + 1 > w or y + r + 1 > h:
        raise InvalidInputError(f"DAI: the radius-{r} patch around the {what} point ({x}, {y}) leaves the {w}x{h} "
                                f"image")
    return img[y - r:y + r + 1, x - r:x + r + 1]


def dai(original: np.ndarray, result: np.ndarray, points, r: int) -> dict:
    """original, result: HxWx3 uint8 of the same size; points: [((hx, hy), (tx, ty)), ...]."""
    if original.shape != result.shape:
        raise InvalidInputError(f"DAI: the result is {result.shape}, the original {original.shape}; they must match")
    a = original.astype(np.float64) / 255.0
    b = result.astype(np.float64) / 255.0
    total = 0.0
    for start, target in points:
        d = _patch(a, start, r, "handle") - _patch(b, target, r, "target")
        total += float(np.sum(d * d))
    n = len(points)
    per_pair = total / n / (1 + 2 * r) ** 2
    return {f"dai_per_pair_r{r}": per_pair, f"dai_official_r{r}": per_pair / n}


class DAIMetric:
    name = "dai"

    def __init__(self, radii=RADII):
        self.radii = tuple(int(r) for r in radii)

    def config(self) -> dict:
        return {"radii": list(self.radii), "reference": "GoodDrag evaluation/compute_DAI.py"}

    def setup(self, device=None) -> None:
        pass

    def score(self, sample, edited, record) -> dict:
        result = np.array(edited.convert("RGB"))
        out = {}
        for r in self.radii:
            out.update(dai(sample.image, result, sample.points, r))
        return out
