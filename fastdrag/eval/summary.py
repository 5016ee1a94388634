"""summary.json, summary.md and grid.png from the files of a run folder (whichever workers wrote them)."""

from __future__ import annotations

import math
import re
import os
import platform
import subprocess
import sys

from . import datasets as ds
from . import store


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("fastdrag", "torch", "diffusers", "transformers", "ray"):
        mod = sys.modules.get(name)
        if mod is None and name != "ray":
            try:
                mod = __import__(name)
            except ImportError:
                mod = None
        out[name] = getattr(mod, "__version__", None) if mod is not None else None
    return out


def _commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _scalars(metrics: dict) -> dict:
    out = {}
    for name, entry in metrics.items():
        for k, v in entry.get("values", {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = float(v)
    return out


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _mean(values: list) -> dict:
    return {"mean": sum(values) / len(values) if values else None, "n": len(values)}


def collect(run_dir: str, refs: list) -> dict:
    rows, failures, pending = [], [], []
    for ref in refs:
        d = store.sample_dir(run_dir, ref.id)
        if store.is_done(run_dir, ref.id):
            rec = store.read_json(os.path.join(d, store.RESULT))
            mpath = os.path.join(d, store.METRICS)
            metrics = store.read_json(mpath) if os.path.exists(mpath) else {}
            rec["metrics"] = _scalars(metrics)
            for name, entry in metrics.items():
                if entry.get("error"):
                    failures.append({"id": ref.id, "phase": f"score:{name}", "error": entry["error"]})
            rows.append(rec)
        elif os.path.exists(os.path.join(d, store.FAILED)):
            rec = store.read_json(os.path.join(d, store.FAILED))
            failures.append({"id": ref.id, "phase": "edit", "error": rec.get("error")})
        else:
            pending.append(ref.id)
    return {"rows": rows, "failures": failures, "pending": pending}


def _means(rows: list, keys: list) -> dict:
    out = {k: _mean([r["metrics"][k] for r in rows if k in r["metrics"]]) for k in keys}
    pairs = [r["metrics"] for r in rows if "md_pairs_sum" in r["metrics"]]
    if pairs:  # the official MD: one mean over every pair of the dataset
        n = sum(m["md_pairs_n"] for m in pairs)
        out["md_official"] = {"mean": sum(m["md_pairs_sum"] for m in pairs) / n, "n": len(pairs), "pairs": n}
    return out


def write_summary(run_dir: str, refs: list, run_config: dict, device: str | None = None) -> dict:
    c = collect(run_dir, refs)
    rows = c["rows"]
    keys = sorted({k for r in rows for k in r["metrics"]} - {"md_pairs_sum", "md_pairs_n"})
    overall = _means(rows, keys)
    cats = sorted({r["category"] for r in rows if r.get("category")})
    per_cat = {cat: _means([r for r in rows if r.get("category") == cat], keys) for cat in cats}
    keys = sorted(overall, key=_natural)
    summary = {
        "counts": {"samples": len(refs), "done": len(rows), "failed": len({f["id"] for f in c["failures"]
                                                                          if f["phase"] == "edit"}),
                   "pending": len(c["pending"])},
        "metrics": overall, "per_category": per_cat, "failures": c["failures"], "pending": c["pending"],
        "config": run_config, "versions": _versions(), "commit": _commit(),
        "device": device or sorted({r.get("device") for r in rows if r.get("device")}),
        "edit_seconds": _mean([r["timings"]["total"] for r in rows if "timings" in r]),
    }
    store.atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
    store.atomic_write_bytes(os.path.join(run_dir, "summary.md"), _markdown(summary, keys).encode())
    return summary


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _markdown(s: dict, keys: list) -> str:
    cfg = s["config"]
    n = s["counts"]
    lines = [f"# fastdrag eval: {cfg.get('method')} on {os.path.basename(cfg.get('dataset', ''))} "
             f"({cfg.get('layout')})", "",
             f"samples {n['samples']}: done {n['done']}, failed {n['failed']}, not run {n['pending']}", "",
             f"model `{cfg.get('model')}`, preset `{cfg.get('preset')}`, seed {cfg.get('seed')} "
             f"({cfg.get('seed_mode')}), commit `{s['commit']}`, device {s['device']}", ""]
    if keys:
        lines += ["| metric | mean | n |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(s['metrics'][k]['mean'])} | {s['metrics'][k]['n']} |" for k in keys]
        if s["per_category"]:
            lines += ["", "| category | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            for cat, m in s["per_category"].items():
                lines.append(f"| {cat} | " + " | ".join(_fmt(m[k]["mean"]) for k in keys) + " |")
    else:
        lines.append("no metrics scored yet")
    if s["failures"]:
        lines += ["", "## failures", ""]
        lines += [f"- `{f['id']}` ({f['phase']}): {str(f['error']).splitlines()[-1][:200]}" for f in s["failures"]]
    if s["pending"]:
        lines += ["", f"not run yet: {', '.join(s['pending'][:20])}" + (" ..." if len(s["pending"]) > 20 else "")]
    return "\n".join(lines) + "\n"


def write_grid(run_dir: str, refs: list, k: int = 8, width: int = 256) -> str | None:
    """grid.png: one row per sample (the first k done): input with handle->target arrows | result with the final
    handles (red) and the targets (blue rings)."""
    from PIL import Image, ImageDraw

    rows = []
    for ref in refs:
        if len(rows) == k:
            break
        if not store.is_done(run_dir, ref.id):
            continue
        d = store.sample_dir(run_dir, ref.id)
        rec = store.read_json(os.path.join(d, store.RESULT))
        src = Image.fromarray(ds.read_sample(ref).image)
        with Image.open(os.path.join(d, store.EDITED)) as im:
            out = im.convert("RGB").resize(src.size)
        s = width / src.width
        h = max(1, round(src.height * s))
        row = Image.new("RGB", (2 * width + 8, h), (255, 255, 255))
        row.paste(src.resize((width, h)), (0, 0))
        row.paste(out.resize((width, h)), (width + 8, 0))
        dr = ImageDraw.Draw(row)
        r = max(2, width // 80)
        for ((hx, hy), (tx, ty)), (fx, fy) in zip(rec["points"], rec["final_handles"]):
            hx, hy, tx, ty, fx, fy = (v * s for v in (hx, hy, tx, ty, fx, fy))
            dr.line([(hx, hy), (tx, ty)], fill=(255, 255, 255), width=max(1, r // 2))
            dr.ellipse([hx - r, hy - r, hx + r, hy + r], fill=(230, 30, 30))
            dr.ellipse([tx - r, ty - r, tx + r, ty + r], fill=(30, 90, 230))
            ox = width + 8
            dr.ellipse([ox + tx - r, ty - r, ox + tx + r, ty + r], outline=(30, 90, 230))
            dr.ellipse([ox + fx - r, fy - r, ox + fx + r, fy + r], fill=(230, 30, 30))
        rows.append(row)
    if not rows:
        return None
    grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows) + 8 * (len(rows) - 1)), (255, 255, 255))
    y = 0
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height + 8
    path = os.path.join(run_dir, "grid.png")
    store.atomic_save_image(path, grid)
    return path
