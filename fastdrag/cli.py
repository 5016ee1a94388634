"""Command line: `fastdrag edit`, `fastdrag demo`, `fastdrag bench`; the same calls as the Python API.

Every config field of every method is a flag (`--n-pix-step 40`, `--latent-lr 0.02`, `--optimize-text`); only
the flags you give are passed, and make_config rejects one the chosen method does not have.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from importlib import resources

from .config import CONFIGS, PRESETS
from .errors import FastDragError, InvalidInputError

DEMO_POINTS = [((52, 44), (72, 40)), ((122, 52), (122, 34))]  # tree crown right-up; house roof up


def _config_fields() -> dict[str, dataclasses.Field]:
    out: dict[str, dataclasses.Field] = {}
    for cls in CONFIGS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, (f, hints[f.name]))
    return out


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method options (any config field; see fastdrag.config)")
    for name, (f, tp) in sorted(_config_fields().items()):
        flag = "--" + name.replace("_", "-")
        if tp is bool:
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            g.add_argument(flag, dest=name, type=tp, default=argparse.SUPPRESS, metavar=tp.__name__.upper())


def _parse_drag(s: str):
    try:
        h, t = s.split(":")
        hx, hy = (float(v) for v in h.split(","))
        tx, ty = (float(v) for v in t.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--drag expects hx,hy:tx,ty (image pixels), got {s!r}") from None
    return (hx, hy), (tx, ty)


class _TqdmProgress:
    """A tqdm bar per stage, on stderr."""

    def __init__(self):
        self.bar = None
        self.stage = None

    def __call__(self, p) -> None:
        from tqdm import tqdm

        if p.stage != self.stage:
            self.close()
            self.stage = p.stage
            # disable=None: bars only on a terminal, so logs and CI output are not flooded
            self.bar = tqdm(total=p.total, desc=f"{p.stage:>8s}", leave=False, file=sys.stderr, disable=None)
        self.bar.n = p.step
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _overrides(args, exclude) -> dict:
    fields = _config_fields()
    return {k: v for k, v in vars(args).items() if k in fields and k not in exclude}


def before_after(image, result, points):
    """Side-by-side picture: input with handle->target arrows, result with the final handles."""
    from PIL import Image, ImageDraw

    w, h = image.size
    canvas = Image.new("RGB", (2 * w + 8, h), (255, 255, 255))
    canvas.paste(image, (0, 0))
    canvas.paste(result.image, (w + 8, 0))
    d = ImageDraw.Draw(canvas)
    r = max(2, w // 100)
    for ((hx, hy), (tx, ty)), (fx, fy) in zip(points, result.points):
        d.line([(hx, hy), (tx, ty)], fill=(255, 255, 255), width=max(1, r // 2))
        d.ellipse([hx - r, hy - r, hx + r, hy + r], fill=(230, 30, 30))
        d.ellipse([tx - r, ty - r, tx + r, ty + r], fill=(30, 90, 230))
        ox = w + 8
        d.ellipse([ox + tx - r, ty - r, ox + tx + r, ty + r], outline=(30, 90, 230))
        d.ellipse([ox + fx - r, fy - r, ox + fx + r, fy + r], fill=(230, 30, 30))
    return canvas


def _check_out(path: str) -> None:
    from PIL import Image

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InvalidInputError(f"--out {path!r}: folder {folder!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if Image.registered_extensions().get(ext) not in Image.SAVE:
        raise InvalidInputError(f"--out {path!r}: {ext or 'no extension'} is not an image format PIL writes; use .png "
                                f"or .jpg")


def _run_edit(args, image, points, mask) -> int:
    from . import api
    from .model import load_model

    _check_out(args.out)  # before the edit, not after it
    model = load_model(args.model, device=args.device, vae=args.vae)
    overrides = _overrides(args, exclude=())
    progress = _TqdmProgress()
    try:
        result = api.Editor(model).edit(image, points, mask=mask, prompt=args.prompt, method=args.method,
                                        seed=args.seed, progress=progress, preset=args.preset, **overrides)
    finally:
        progress.close()
    from .pipeline import load_image

    if getattr(args, "side_by_side", False):
        before_after(load_image(image), result, points).save(args.out)
    else:
        result.image.save(args.out)
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    pts = "; ".join(f"({x:.0f}, {y:.0f})" for x, y in result.points)
    label = args.method + (" + optimize_text" if result.config.optimize_text and args.method != "dragtext" else "")
    print(f"wrote {args.out}  [{label}, {stages}]  final handles: {pts}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ui"]:  # its own parser (fastdrag/ui.py), behind the optional gradio extra
        from . import ui

        return ui.main(argv[1:])
    ap = argparse.ArgumentParser(prog="fastdrag", description="Point-based (drag) image editing on SD-1.5.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, model_default):
        p.add_argument("--method", default="dragdiffusion", choices=sorted(CONFIGS))
        p.add_argument("--preset", default=None, help="named preset: " + "; ".join(
            f"{m}: {', '.join(v)}" for m, v in PRESETS.items() if v))
        p.add_argument("--prompt", default="")
        p.add_argument("--model", default=model_default, help='"tiny", a local diffusers folder or a hub id')
        p.add_argument("--vae", default=None, help="replacement VAE (id or folder), e.g. stabilityai/sd-vae-ft-mse")
        p.add_argument("--device", default=None)
        p.add_argument("--seed", type=int, default=42)
        _add_config_flags(p)

    pe = sub.add_parser("edit", help="drag points in an image")
    pe.add_argument("--image", required=True)
    pe.add_argument("--drag", required=True, action="append", type=_parse_drag, metavar="HX,HY:TX,TY")
    pe.add_argument("--mask", default=None, help="PNG, non-zero = may change")
    pe.add_argument("--out", required=True)
    pe.add_argument("--side-by-side", action="store_true", help="write input-with-arrows | result")
    common(pe, "runwayml/stable-diffusion-v1-5")

    pd = sub.add_parser("demo", help="a full edit on the built-in tiny model; writes a before/after PNG")
    pd.add_argument("--out", default="demo.png")
    common(pd, "tiny")

    pb = sub.add_parser("bench", help="latency benchmark (python -m benchmarks.latency)")
    pb.add_argument("rest", nargs=argparse.REMAINDER)

    sub.add_parser("ui", help="the web UI (pip install fastdrag[ui]); fastdrag ui --help for its options")

    args = ap.parse_args(argv)
    try:
        if args.cmd == "edit":
            return _run_edit(args, args.image, args.drag, args.mask)
        if args.cmd == "demo":
            if args.model == "tiny":
                print("fastdrag demo: the built-in tiny model has RANDOM weights, so the picture shows the pipeline "
                      "running end to end, not a meaningful edit. Use --model with a real SD-1.5 for that.")
            args.side_by_side = True
            image = str(resources.files("fastdrag.assets") / "demo.png")
            return _run_edit(args, image, DEMO_POINTS, None)
        if args.cmd == "bench":
            from benchmarks import latency

            return latency.main(args.rest)
    except FastDragError as e:
        print(f"fastdrag: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
