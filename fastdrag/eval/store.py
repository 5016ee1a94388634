"""The run folder: atomic writes, per-sample records, the stored run config.

    RUN_DIR/run.json                       the run's config (compared on every re-run)
    RUN_DIR/samples/<id>/edited.png        the edited image (same size as the input)
    RUN_DIR/samples/<id>/result.json       final handles, timings, seed; written last: its presence = done
    RUN_DIR/samples/<id>/failed.json       why the sample failed (removed when a re-run succeeds)
    RUN_DIR/samples/<id>/metrics.json      the scoring phase's values, one key per metric
Every file is written to a temporary name in the same folder and renamed, so a killed run leaves either the old
file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile

from ..errors import ConfigError

RESULT, FAILED, EDITED, METRICS = "result.json", "failed.json", "edited.png", "metrics.json"


def atomic_write_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def atomic_save_image(path: str, image) -> None:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def sample_dir(run_dir: str, sample_id: str) -> str:
    return os.path.join(run_dir, "samples", *sample_id.split("/"))


def is_done(run_dir: str, sample_id: str) -> bool:
    d = sample_dir(run_dir, sample_id)
    return os.path.isfile(os.path.join(d, RESULT)) and os.path.isfile(os.path.join(d, EDITED))


def _plain(obj):
    return json.loads(json.dumps(obj, sort_keys=True))


def check_or_store_config(run_dir: str, config: dict, name: str = "run.json") -> None:
    """Store `config` in a new run folder; in an existing one, refuse a config that differs from the stored one
    (a changed config is a new run: give another RUN_DIR)."""
    path = os.path.join(run_dir, name)
    config = _plain(config)
    if os.path.exists(path):
        old = read_json(path)
        if old != config:
            keys = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            details = "; ".join(f"{k}: stored {old.get(k)!r:.80} vs now {config.get(k)!r:.80}" for k in keys[:6])
            raise ConfigError(f"{run_dir!r} holds a run with another config ({details}); a changed config is a new "
                              f"run: pass another --out folder, or delete this one")
        return
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_json(path, config)
