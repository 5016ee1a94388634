"""The scoring phase: reads the edit phase's files, writes each sample's metrics.json; resumable per metric.

Kept apart from editing because MD's SD-2.1 pass is heavy and needs other weights: `--phase score` re-scores a
finished run without editing again. A metric already stored for a sample under the same config is skipped; values
under another config are refused (score.json keeps each metric's config).
"""

from __future__ import annotations

import os
import traceback

from ..errors import ConfigError, FastDragError
from . import datasets as ds
from . import store
from .editing import worker_name
from .metrics import build


def check_or_store_metric_configs(run_dir: str, metrics: list) -> None:
    path = os.path.join(run_dir, "score.json")
    stored = store.read_json(path) if os.path.exists(path) else {}
    changed = False
    for m in metrics:
        cfg = store._plain(m.config())
        if m.name in stored and stored[m.name] != cfg:
            raise ConfigError(f"{run_dir!r} holds {m.name} values computed under another config (stored "
                              f"{stored[m.name]!r:.120}, now {cfg!r:.120}); score into a new run folder or delete "
                              f"score.json and the samples' metrics.json")
        if m.name not in stored:
            stored[m.name], changed = cfg, True
    if changed:
        store.atomic_write_json(path, stored)


class SampleScorer:
    """One worker's metrics, their networks loaded once."""

    def __init__(self, metric_options: dict, device: str | None = None):
        self.metrics = [build(name, **opts) for name, opts in metric_options.items()]
        for m in self.metrics:
            m.setup(device)

    def run(self, ref: ds.SampleRef, run_dir: str) -> dict:
        from PIL import Image

        d = store.sample_dir(run_dir, ref.id)
        mpath = os.path.join(d, store.METRICS)
        values = store.read_json(mpath) if os.path.exists(mpath) else {}
        errors = []
        sample = ds.read_sample(ref)
        record = store.read_json(os.path.join(d, store.RESULT))
        with Image.open(os.path.join(d, store.EDITED)) as im:
            edited = im.convert("RGB")
        for m in self.metrics:
            if m.name in values and "values" in values[m.name]:
                continue
            try:
                values[m.name] = {"values": m.score(sample, edited, record)}
            except Exception as e:  # noqa: BLE001 - recorded, reported in the summary; the run goes on
                detail = "".join(traceback.format_exception_only(type(e), e)).strip()
                values[m.name] = {"error": detail}
                if not isinstance(e, FastDragError):
                    values[m.name]["traceback"] = traceback.format_exc()
                errors.append(f"{m.name}: {detail}")
            store.atomic_write_json(mpath, values)
        return {"id": ref.id, "status": "failed" if errors else "done", "error": "; ".join(errors) or None,
                "worker": worker_name()}
