"""Synthetic benchmark folders in the official file formats, built by the tests (no files outside the repo)."""

import json
import os
import pickle

import numpy as np
from PIL import Image

from .conftest import smooth_image


def make_dragbench(root, samples=(("animals", "a1", 0), ("art_work", "b1", 1)), size=(64, 64), lora=False):
    """DragBench: <category>/<sample>/original_image.png + meta_data.pkl as labeling_tool.py writes them (points a
    list of (x, y) int tuples alternating handle/target, mask an HxW uint8 0/1 array)."""
    root, (h, w) = str(root), size
    for cat, name, seed in samples:
        d = os.path.join(root, cat, name)
        os.makedirs(d)
        Image.fromarray(smooth_image(h, w, seed=seed)).save(os.path.join(d, "original_image.png"))
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
        meta = {"prompt": f"a photo {seed}", "points": [(20, 24), (28, 26)], "mask": mask}
        with open(os.path.join(d, "meta_data.pkl"), "wb") as f:
            pickle.dump(meta, f)
        if lora:
            os.makedirs(os.path.join(root + "_lora", cat, name, "80"))
    return str(root)


def make_drag100(root, names=("cat_2", "furniture_0"), size=(72, 72)):
    """Drag100: <sample>/original.jpg, mask.png (RGB, 255 = editable), points.json written as the GoodDrag UI
    writes it: {"points": [[x, y], ...]} (handle, target, ...), json.dump's default separators."""
    root, (h, w) = str(root), size
    for i, name in enumerate(names):
        d = os.path.join(root, name)
        os.makedirs(d)
        Image.fromarray(smooth_image(h, w, seed=10 + i)).save(os.path.join(d, "original.jpg"), quality=95)
        mask = np.zeros((h, w, 3), np.uint8)
        mask[8:64, 8:64] = 255
        Image.fromarray(mask).save(os.path.join(d, "mask.png"))
        with open(os.path.join(d, "points.json"), "w") as f:
            json.dump({"points": [[30, 20], [36, 22], [40, 44], [34, 40]]}, f)
    return str(root)
