"""`fastdrag eval DATASET_DIR --method M --out RUN_DIR`: the edit phase, then the scoring phase, then the summary.

    fastdrag eval drag_bench_data --method dragdiffusion --preset bench --out runs/dd --metrics dai
    fastdrag eval dataset --method gooddrag --preset bench --out runs/gd --workers 2
    fastdrag eval drag_bench_data --method dragdiffusion --out runs/dd --ray auto --phase edit

A re-run of the same command resumes: done samples and stored metrics are skipped.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from ..errors import ConfigError
from . import datasets as ds
from . import runner, store
from .editing import SEED_MODES, EditSpec, SampleEditor, check_lora_support, write_failure
from .metrics import NAMES as METRIC_NAMES
from .scoring import SampleScorer, check_or_store_metric_configs
from .summary import write_grid, write_summary


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import _add_config_flags
    from ..config import CONFIGS, PRESETS

    p.add_argument("dataset", help="DragBench root (<category>/<sample>/...) or Drag100 root (<sample>/...)")
    p.add_argument("--out", required=True, help="run folder (created; a re-run of the same command resumes)")
    p.add_argument("--method", default="dragdiffusion", choices=sorted(CONFIGS))
    p.add_argument("--preset", default=None, help="named preset: " + "; ".join(
        f"{m}: {', '.join(v)}" for m, v in PRESETS.items() if v))
    p.add_argument("--model", default="runwayml/stable-diffusion-v1-5", help='"tiny", a diffusers folder or hub id')
    p.add_argument("--vae", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=42, help="the official scripts use 42 for every sample")
    p.add_argument("--seed-mode", default="same", choices=SEED_MODES,
                   help="same: --seed for every sample (official); per-sample: a hash of --seed and the sample id")
    p.add_argument("--sample-lora", default=None, metavar="ROOT",
                   help="per-sample LoRA tree <ROOT>/<category>/<sample>[/<steps>] (DragBench's drag_bench_lora): "
                        "passed as lora=<folder> instead of fitting one")
    p.add_argument("--sample-lora-steps", type=int, default=None, help="the <steps> level of --sample-lora")
    p.add_argument("--phase", default="all", choices=("edit", "score", "all"))
    p.add_argument("--metrics", default="dai", help=f"comma-separated, of {', '.join(METRIC_NAMES)} ('' = none)")
    p.add_argument("--lpips-weights", default=None, help="LPIPS v0.1 alex.pth (lpips package / torchmetrics wheel)")
    p.add_argument("--alexnet-weights", default=None, help="torchvision AlexNet state dict (alexnet-owt-7be5be79.pth)")
    p.add_argument("--score-clip-model", default="openai/clip-vit-base-patch32",
                   help="CLIPModel id or folder for the clip metric (ViT-B/32)")
    p.add_argument("--dift-model", default="stabilityai/stable-diffusion-2-1", help="SD-2.1 id or folder for MD")
    p.add_argument("--md-seed-mode", default="per-sample", choices=("official", "per-sample"),
                   help="official: one seed for the whole run, order-dependent; per-sample: shard-independent")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes on this machine, or Ray actors (default: 1; with --ray, one per GPU)")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="run the workers as Ray actors: 'local', 'auto' "
                                                                  "or a cluster address")
    p.add_argument("--ray-gpus", type=float, default=None, help="GPUs per Ray actor (default 1 if the cluster has "
                                                                "GPUs, else 0)")
    p.add_argument("--grid", type=int, default=8, help="samples in grid.png")
    _add_config_flags(p)


def metric_options(args) -> dict:
    names = [n.strip() for n in (args.metrics or "").split(",") if n.strip()]
    for n in names:
        if n not in METRIC_NAMES:
            raise ConfigError(f"--metrics: unknown metric {n!r}; expected some of {', '.join(METRIC_NAMES)}")
    out = {}
    for n in names:
        if n == "dai":
            out[n] = {}
        elif n == "lpips":
            out[n] = {"lpips_weights": args.lpips_weights, "alexnet_weights": args.alexnet_weights}
        elif n == "clip":
            out[n] = {"model": args.score_clip_model}
        elif n == "md":
            out[n] = {"model": args.dift_model, "seed": args.seed, "seed_mode": args.md_seed_mode}
    return out


def _dispatch(make, refs, run_dir, label, args, on_record_extra=None) -> None:
    progress = runner.ProgressLog(len(refs), label)

    def on_record(ref, rec):
        progress.update(rec)

    def on_death(ref, why):
        progress.update(write_failure(run_dir, ref, why) if label == "edit" else
                        {"id": ref.id, "status": "failed", "error": why})

    try:
        if args.ray is not None:
            ray = runner.init_ray(args.ray)
            cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
            gpus = args.ray_gpus if args.ray_gpus is not None else (1.0 if cluster_gpus else 0.0)
            n = args.workers or max(1, int(cluster_gpus // gpus) if gpus else 1)
            runner.run_ray(make, refs, run_dir, on_record, n, on_death, gpus)
        elif (args.workers or 1) > 1:
            runner.run_processes(make, refs, run_dir, on_record, args.workers, on_death)
        else:
            runner.run_in_process(make, refs, run_dir, on_record)
    finally:
        progress.close()


def run_eval(args, log=None) -> dict:
    log = log or sys.stderr
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    from ..cli import _overrides

    spec = EditSpec(dataset=args.dataset, method=args.method, preset=args.preset, overrides=_overrides(args, ()),
                    model=args.model, vae=args.vae, seed=args.seed, seed_mode=args.seed_mode,
                    sample_lora=args.sample_lora, sample_lora_steps=args.sample_lora_steps)
    layout = ds.detect_layout(spec.dataset)
    refs = ds.scan(spec.dataset, layout)
    if spec.sample_lora is not None:
        import fastdrag

        check_lora_support(fastdrag.Editor)
    mopts = metric_options(args) if args.phase in ("score", "all") else {}
    distributed = (args.workers or 1) > 1 or args.ray is not None
    if mopts.get("md", {}).get("seed_mode") == "official" and distributed:
        raise ConfigError("--md-seed-mode official draws one random stream in dataset order; it cannot be split "
                          "over workers: use --md-seed-mode per-sample or --workers 1")
    run_config = spec.run_config(layout)
    store.check_or_store_config(args.out, run_config)
    if args.phase in ("edit", "all"):
        todo = [r for r in refs if not store.is_done(args.out, r.id)]
        print(f"fastdrag eval: {len(refs)} {layout} samples, {len(refs) - len(todo)} already edited, {len(todo)} to "
              f"edit -> {args.out}", file=log, flush=True)
        if todo:
            _dispatch(functools.partial(SampleEditor, spec, args.device), todo, args.out, "edit", args)
    if mopts:
        from .metrics import build

        # built for their configs only: networks load in the workers (setup)
        check_or_store_metric_configs(args.out, [build(n, **o) for n, o in mopts.items()])
        todo = [r for r in refs if store.is_done(args.out, r.id) and _needs_score(args.out, r.id, mopts)]
        print(f"fastdrag eval: scoring {', '.join(mopts)} on {len(todo)} samples", file=log, flush=True)
        if todo:
            _dispatch(functools.partial(SampleScorer, mopts, args.device), todo, args.out, "score", args)
    summary = write_summary(args.out, refs, run_config)
    write_grid(args.out, refs, k=args.grid)
    n = summary["counts"]
    print(f"fastdrag eval: done {n['done']}, failed {n['failed']}, not run {n['pending']}; "
          f"{os.path.join(args.out, 'summary.md')}", file=log, flush=True)
    return summary


def _needs_score(run_dir, sample_id, mopts) -> bool:
    path = os.path.join(store.sample_dir(run_dir, sample_id), store.METRICS)
    if not os.path.exists(path):
        return True
    have = store.read_json(path)
    return any("values" not in have.get(n, {}) for n in mopts)
