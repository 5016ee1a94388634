"""The edit phase: every sample through fastdrag.Editor, one folder of outputs per sample, resumable.

Only the public API is used (fastdrag.load_model, fastdrag.Editor, fastdrag.make_config). A sample's seed depends
on the run's seed and the sample's id only (never on the order, the shard or the worker), so any split of the
samples over workers writes the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field

from ..errors import ConfigError, FastDragError
from . import datasets as ds
from . import store

SEED_MODES = ("same", "per-sample")


@dataclass
class EditSpec:
    """Everything that decides the edited images. Stored in run.json and compared on a re-run."""

    dataset: str
    method: str = "dragdiffusion"
    preset: str | None = None
    overrides: dict = field(default_factory=dict)
    model: str = "runwayml/stable-diffusion-v1-5"
    vae: str | None = None
    seed: int = 42
    seed_mode: str = "same"  # "same": every sample gets `seed` (the official scripts' 42); "per-sample": hashed id
    sample_lora: str | None = None  # root of a per-sample LoRA tree (<root>/<category>/<sample>[/<steps>])
    sample_lora_steps: int | None = None

    def __post_init__(self):
        if self.seed_mode not in SEED_MODES:
            raise ConfigError(f"seed_mode must be one of {SEED_MODES}, got {self.seed_mode!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ConfigError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        self.dataset = os.path.abspath(self.dataset)
        if self.sample_lora is not None:
            self.sample_lora = os.path.abspath(self.sample_lora)

    def resolved_config(self) -> dict:
        """The method's full config (defaults + preset + overrides) as a dict, whatever its fields."""
        from .. import make_config

        return dataclasses.asdict(make_config(self.method, preset=self.preset, **self.overrides))

    def run_config(self, layout: str) -> dict:
        d = dataclasses.asdict(self)
        d["layout"] = layout
        d["config"] = self.resolved_config()
        return d

    def sample_seed(self, sample_id: str) -> int:
        if self.seed_mode == "same":
            return self.seed
        return int.from_bytes(hashlib.sha256(f"{self.seed}:{sample_id}".encode()).digest()[:8], "little") >> 1


def check_lora_support(editor_cls) -> None:
    """--sample-lora passes lora=<folder> to Editor.edit; an installed fastdrag without that argument is an error
    before any edit runs (its **overrides would reject the key only at the first sample)."""
    if "lora" not in inspect.signature(editor_cls.edit).parameters:
        raise ConfigError("--sample-lora needs a fastdrag whose Editor.edit accepts lora=FOLDER; the installed "
                          f"fastdrag ({sys.modules['fastdrag'].__file__}) does not")


class SampleEditor:
    """One worker's state: the model, loaded once, and its Editor."""

    def __init__(self, spec: EditSpec, device: str | None = None):
        import fastdrag

        self.spec = spec
        if spec.sample_lora is not None:
            check_lora_support(fastdrag.Editor)
        self.model = fastdrag.load_model(spec.model, device=device, vae=spec.vae)
        self.editor = fastdrag.Editor(self.model, max_cached=1)
        self.device = str(self.model.device)

    def run(self, ref: ds.SampleRef, run_dir: str) -> dict:
        """Edit one sample and write its files. Returns its record; a bad sample or a failed edit is a record with
        status "failed" and the error (written to failed.json), never an exception."""
        folder = store.sample_dir(run_dir, ref.id)
        seed = self.spec.sample_seed(ref.id)
        t0 = time.perf_counter()
        try:
            sample = ds.read_sample(ref)
            kw = {}
            if self.spec.sample_lora is not None:
                kw["lora"] = ds.lora_folder(self.spec.sample_lora, ref, self.spec.sample_lora_steps)
            result = self.editor.edit(sample.image, sample.points, mask=sample.mask, prompt=sample.prompt,
                                      method=self.spec.method, seed=seed, preset=self.spec.preset,
                                      **kw, **self.spec.overrides)
        except Exception as e:  # noqa: BLE001 - a sample's failure is recorded with its traceback, the run goes on
            return write_failure(run_dir, ref, e, seed=seed, device=self.device,
                                 traceback=None if isinstance(e, FastDragError) else traceback.format_exc())
        store.atomic_save_image(os.path.join(folder, store.EDITED), result.image)
        record = dict(id=ref.id, category=ref.category, status="done", seed=seed, device=self.device,
                      points=[[list(h), list(t)] for h, t in sample.points],
                      final_handles=[list(p) for p in result.points],
                      timings=dict(result.timings), wall_s=time.perf_counter() - t0, worker=worker_name())
        store.atomic_write_json(os.path.join(folder, store.RESULT), record)
        failed = os.path.join(folder, store.FAILED)
        if os.path.exists(failed):
            os.remove(failed)
        return record


def write_failure(run_dir: str, ref: ds.SampleRef, err, **extra) -> dict:
    if isinstance(err, BaseException):
        detail = "".join(traceback.format_exception_only(type(err), err)).strip()
    else:
        detail = str(err)
    record = dict(id=ref.id, category=ref.category, status="failed", error=detail, worker=worker_name(), **extra)
    store.atomic_write_json(os.path.join(store.sample_dir(run_dir, ref.id), store.FAILED), record)
    return record


def worker_name() -> str:
    return f"{platform.node()}:{os.getpid()}"
