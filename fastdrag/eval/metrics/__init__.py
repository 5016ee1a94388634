"""The field's metrics, one module each, each citing its reference definition.

A metric is built from its options (`build(name, **options)`), loads its networks once per worker (`setup`), and
scores one sample: `score(sample, edited, record) -> {name: float, ...}` (sample: the dataset Sample, edited: the
edited PIL image, record: the edit's result.json). `config()` is what decides its values; the run stores it and
refuses to mix values computed under another config.
"""

from __future__ import annotations

from ...errors import ConfigError

NAMES = ("dai", "lpips", "clip", "md")


def build(name: str, **options):
    if name == "dai":
        from .dai import DAIMetric as cls
    elif name == "lpips":
        from .lpips import LPIPSMetric as cls
    elif name == "clip":
        from .clip_sim import CLIPSimilarityMetric as cls
    elif name == "md":
        from .md import MeanDistanceMetric as cls
    else:
        raise ConfigError(f"unknown metric {name!r}; expected one of {NAMES}")
    return cls(**options)
