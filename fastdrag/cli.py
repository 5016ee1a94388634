"""Command line: `fastdrag edit`, `fastdrag demo`, `fastdrag bench`; the same calls as the Python API.

Every config field of every method is a flag (`--n-pix-step 40`, `--latent-lr 0.02`, `--optimize-text`); only
the flags you give are passed, and make_config rejects one the chosen method does not have.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
import tempfile
import time
import typing
from importlib import resources

from .config import CONFIGS, FIELD_HELP, PRESETS
from .errors import FastDragError, InvalidInputError

DEMO_POINTS = [((52, 44), (72, 40)), ((122, 52), (122, 34))]  # tree crown right-up; house roof up


def _config_fields() -> dict[str, dataclasses.Field]:
    out: dict[str, dataclasses.Field] = {}
    for cls in CONFIGS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, (f, hints[f.name]))
    return out


def field_help(name: str) -> str:
    """One line for a config field: what it does (config.FIELD_HELP), the methods that take it and their defaults,
    and the presets that change it, all read from the config classes and PRESETS."""
    defaults = {m: f.default for m, cls in CONFIGS.items() for f in dataclasses.fields(cls) if f.name == name}
    by_value: dict = {}
    for m, v in defaults.items():
        by_value.setdefault(repr(v), []).append(m)
    common = max(by_value, key=lambda v: len(by_value[v]))
    who = "all methods" if len(defaults) == len(CONFIGS) else ", ".join(defaults)
    text = f"{FIELD_HELP.get(name, '')} [{who}; default {common}"
    others = [f"{', '.join(ms)}: {v}" for v, ms in by_value.items() if v != common]
    if others:
        text += " (" + "; ".join(others) + ")"
    presets = [f"{m} --preset {p}: {vals[name]!r}" for m, ps in PRESETS.items() for p, vals in ps.items()
               if name in vals and vals[name] != defaults.get(m)]
    if presets:
        text += "; " + "; ".join(presets)
    return (text + "]").replace("%", "%%")  # argparse formats help strings with %


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method options (fields of the method's config, fastdrag.config; a flag the chosen "
                             "method does not take is an error)")
    for name, (f, tp) in sorted(_config_fields().items()):
        flag = "--" + name.replace("_", "-")
        if tp is bool:
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=field_help(name))
        else:
            g.add_argument(flag, dest=name, type=tp, default=argparse.SUPPRESS, metavar=tp.__name__.upper(),
                           help=field_help(name))


def _parse_drag(s: str):
    try:
        h, t = s.split(":")
        hx, hy = (float(v) for v in h.split(","))
        tx, ty = (float(v) for v in t.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--drag expects hx,hy:tx,ty (image pixels), got {s!r}") from None
    return (hx, hy), (tx, ty)


def _join_negative_drags(argv: list[str]) -> list[str]:
    """`--drag -5,40:30,80` -> `--drag=-5,40:30,80`: argparse takes a value that starts with '-' (and is not a plain
    number) for an option and stops. Joined, the negative coordinate reaches the point check, which names it."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--":  # what follows is passed on as it is (fastdrag bench -- ...)
            return out + argv[i:]
        if argv[i] == "--drag" and i + 1 < len(argv) and argv[i + 1].startswith("-") and ":" in argv[i + 1]:
            out.append("--drag=" + argv[i + 1])
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


class _TqdmProgress:
    """A tqdm bar per stage, on stderr (a terminal)."""

    def __init__(self):
        self.bar = None
        self.stage = None

    def __call__(self, p) -> None:
        from tqdm import tqdm

        if p.stage != self.stage:
            self.close()
            self.stage = p.stage
            self.bar = tqdm(total=p.total, desc=f"{p.stage:>8s}", leave=False, file=sys.stderr)
        self.bar.n = p.step
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LineProgress:
    """Progress as plain lines, for a log or a job scheduler (stderr not a terminal): a line when a stage starts,
    every `every` steps (default: a tenth of the stage) or after `interval` seconds without one, when the run moves
    to another stage before this one's last step (GoodDrag alternates drag and denoise; a drag that reaches its
    targets stops early), and when the stage's last step is done. Each line has step/total and the seconds since
    the run began."""

    def __init__(self, stream=None, every: int | None = None, interval: float = 60.0):
        self.stream = stream if stream is not None else sys.stderr
        self.every, self.interval = every, interval
        self.t0 = self.t_line = time.perf_counter()
        self.started: dict[str, float] = {}  # stage -> when it was first seen
        self.last = None  # the latest Progress
        self.last_printed = None

    def _line(self, p, text: str) -> None:
        self.t_line = time.perf_counter()
        self.last_printed = p
        print(f"fastdrag: [{self.t_line - self.t0:7.1f}s] {p.stage}: {text}", file=self.stream, flush=True)

    def __call__(self, p) -> None:
        prev = self.last
        if prev is not None and prev.stage != p.stage and prev.step < prev.total and prev != self.last_printed:
            self._line(prev, f"{prev.step}/{prev.total}")
        self.last = p
        if p.stage not in self.started:
            self.started[p.stage] = time.perf_counter()
            self._line(p, f"start, {p.total} steps")
        every = self.every or max(1, p.total // 10)
        if p.step >= p.total:
            self._line(p, f"done, {p.step}/{p.total} in {time.perf_counter() - self.started[p.stage]:.1f}s")
        elif p.step % every == 0 or time.perf_counter() - self.t_line >= self.interval:
            self._line(p, f"{p.step}/{p.total}")

    def close(self) -> None:
        p = self.last
        if p is not None and p.step < p.total and p != self.last_printed:
            self._line(p, f"{p.step}/{p.total}")


def progress_for(stream) -> "_TqdmProgress | LineProgress":
    """A bar on a terminal, lines otherwise."""
    isatty = getattr(stream, "isatty", None)
    return _TqdmProgress() if isatty is not None and isatty() else LineProgress(stream)


def _overrides(args, exclude) -> dict:
    fields = _config_fields()
    return {k: v for k, v in vars(args).items() if k in fields and k not in exclude}


HANDLE, TARGET, FINAL = (230, 30, 30), (30, 90, 230), (250, 200, 30)  # before_after's colours


def before_after(image, result, points):
    """Side-by-side picture: the input with handle -> target arrows | the result with each target (a ring) and
    the final handle (a dot) under it, so that a handle which reached its target shows inside the ring; a legend
    below."""
    from PIL import Image, ImageDraw

    w, h = image.size
    r = max(3, w // 100)
    legend_h = 4 * r + 12
    canvas = Image.new("RGB", (2 * w + 8, h + legend_h), (255, 255, 255))
    canvas.paste(image, (0, 0))
    canvas.paste(result.image, (w + 8, 0))
    d = ImageDraw.Draw(canvas)
    ring = max(2, r // 2)

    def dot(x, y, colour):
        d.ellipse([x - r, y - r, x + r, y + r], fill=colour)

    def target_ring(x, y):
        # from radius r (the dot's edge, which it covers when drawn after the dot) out to r + ring
        d.ellipse([x - r - ring, y - r - ring, x + r + ring, y + r + ring], outline=TARGET, width=ring + 1)

    ox = w + 8
    for ((hx, hy), (tx, ty)), (fx, fy) in zip(points, result.points):
        d.line([(hx, hy), (tx, ty)], fill=(255, 255, 255), width=max(1, r // 2))
        dot(hx, hy, HANDLE)
        target_ring(tx, ty)
        dot(ox + fx, fy, FINAL)
        target_ring(ox + tx, ty)  # drawn after the final handle: a handle on its target does not hide it
    x, y = 4, h + legend_h // 2
    for label, draw in (("handle", lambda x: dot(x, y, HANDLE)), ("target", lambda x: target_ring(x, y)),
                        ("final handle", lambda x: dot(x, y, FINAL))):
        draw(x + r + ring)
        x += 2 * (r + ring) + 4
        d.text((x, y), label, fill=(0, 0, 0), anchor="lm")
        x += int(d.textlength(label)) + 12
    return canvas


class Output:
    """The output image path, checked before any expensive work and written atomically: into a temporary file in
    the same folder, then renamed over the path, so that a failure or Ctrl-C never leaves a half-written file."""

    def __init__(self, path: str, flag: str = "--out"):
        from PIL import Image

        self.path = path
        where = f"{flag} {path!r}"
        if os.path.isdir(path):
            raise InvalidInputError(f"{where} is a directory; give a file name such as "
                                    f"{os.path.join(path, 'out.png')!r}")
        self.folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(self.folder):
            raise InvalidInputError(f"{where}: folder {self.folder!r} does not exist")
        self.ext = os.path.splitext(path)[1].lower()
        self.format = Image.registered_extensions().get(self.ext)
        if self.format not in Image.SAVE:
            raise InvalidInputError(f"{where}: {self.ext or 'no extension'} is not an image format PIL writes; use "
                                    f".png or .jpg")
        try:  # a format PIL writes but not for RGB pictures (.xbm, .msp) fails now, not after the edit
            Image.new("RGB", (8, 8)).save(io.BytesIO(), format=self.format)
        except Exception as e:  # noqa: BLE001 - any refusal, re-raised with the path
            raise InvalidInputError(f"{where}: PIL cannot write an RGB image as {self.format} ({e}); use .png or "
                                    f".jpg") from None
        try:  # the real test of writability (os.access is not, e.g. for root or on a read-only mount)
            fd, probe = tempfile.mkstemp(prefix=".fastdrag-", suffix=".tmp", dir=self.folder)
        except OSError as e:
            raise InvalidInputError(f"{where}: cannot write in folder {self.folder!r}: {e.strerror or e}") from None
        os.close(fd)
        os.unlink(probe)

    def save(self, image) -> None:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                image.save(f, format=self.format)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; give the output a normal file's mode
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _preflight(args, image, points, mask) -> None:
    """What can be checked without the model: the options and the inputs (image, mask, points, resize), so that a
    mistake costs no model load. The edit checks them again, with the model's native size for its warnings."""
    import warnings

    from .config import make_config
    from .pipeline import make_request

    make_config(args.method, preset=args.preset, **_overrides(args, exclude=()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the edit itself warns
        make_request(image, points, mask, args.prompt, resize_width=args.resize_width)


def _run_edit(args, image, points, mask) -> int:
    from . import api
    from .model import load_model
    from .pipeline import load_image, resize_input

    out = Output(args.out)  # before the edit, not after it
    lora, save_lora = getattr(args, "lora", None), getattr(args, "save_lora", None)
    if lora is not None and save_lora is not None:
        raise InvalidInputError("--lora (use a saved LoRA) and --save-lora (save the fitted one) exclude each other")
    if save_lora is not None and os.path.exists(save_lora) and not os.path.isdir(save_lora):
        raise InvalidInputError(f"--save-lora {save_lora!r} is a file; it names a folder (made if missing)")
    _preflight(args, image, points, mask)
    model = load_model(args.model, device=args.device, vae=args.vae)
    overrides = _overrides(args, exclude=())
    progress = progress_for(sys.stderr)
    editor = api.Editor(model)
    try:
        result = editor.edit(image, points, mask=mask, prompt=args.prompt, method=args.method, seed=args.seed,
                             progress=progress, preset=args.preset, lora=lora, resize_width=args.resize_width,
                             **overrides)
        if save_lora is not None:  # the LoRA the edit fitted, from the Editor's cache
            saved = editor.save_lora(save_lora, image, prompt=args.prompt, method=args.method, seed=args.seed,
                                     preset=args.preset, resize_width=args.resize_width, **overrides)
            print(f"wrote {saved}")
    finally:
        progress.close()
    if getattr(args, "side_by_side", False):
        before, _, (sx, sy) = resize_input(load_image(image), None, args.resize_width)
        scaled = [((hx * sx, hy * sy), (tx * sx, ty * sy)) for (hx, hy), (tx, ty) in points]
        out.save(before_after(before, result, scaled))
    else:
        out.save(result.image)
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    pts = "; ".join(f"({x:.0f}, {y:.0f})" for x, y in result.points)
    label = args.method + (" + optimize_text" if result.config.optimize_text and args.method != "dragtext" else "")
    size = (f"  resized from {result.resized_from[0]}x{result.resized_from[1]} to "
            f"{result.image.width}x{result.image.height};" if result.resized_from else "")
    print(f"wrote {args.out}  [{label}, {stages}]{size}  final handles: {pts}")
    return 0


def _bench_modules() -> dict:
    """The benchmarks `fastdrag bench` runs, by name. Installed they are fastdrag.benchmarks (setup.py maps benchmarks/
    there); a checkout whose editable install predates that mapping finds the source tree's top-level package."""
    try:
        from .benchmarks import kernels, latency
    except ModuleNotFoundError as e:
        if e.name != "fastdrag.benchmarks":
            raise
        try:
            from benchmarks import kernels, latency
        except ModuleNotFoundError:
            raise InvalidInputError("fastdrag bench: this install has no fastdrag.benchmarks package; reinstall "
                                    "fastdrag (pip install .) from a checkout of this version") from None
    return {"latency": latency, "kernels": kernels}


def _add_bench_parsers(pb: argparse.ArgumentParser) -> dict:
    """One subcommand per benchmark, with that benchmark's own options; `fastdrag bench --help` lists them all."""
    mods = _bench_modules()
    bs = pb.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    usages = []
    for name, mod in mods.items():
        p = bs.add_parser(name, help=mod.__doc__.split("\n")[0], description=mod.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        usages.append(p.format_usage().replace("usage: ", "", 1).strip())
    pb.epilog = ("each benchmark's options (fastdrag bench BENCHMARK --help says more):\n  " + "\n  ".join(usages))
    return mods


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ui"]:  # its own parser (fastdrag/ui.py), behind the optional gradio extra
        from . import ui

        return ui.main(argv[1:])
    ap = argparse.ArgumentParser(prog="fastdrag", description="Point-based (drag) image editing on SD-1.5.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, model_default):
        p.add_argument("--method", default="dragdiffusion", choices=sorted(CONFIGS), help="default: dragdiffusion")
        p.add_argument("--preset", default=None, help="named preset: " + "; ".join(
            f"{m}: {', '.join(v)}" for m, v in PRESETS.items() if v))
        p.add_argument("--prompt", default="", help="the image's description (the source prompt)")
        p.add_argument("--model", default=model_default, help='"tiny", a local diffusers folder or a hub id')
        p.add_argument("--vae", default=None, help="replacement VAE (id or folder), e.g. stabilityai/sd-vae-ft-mse")
        p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda if available)")
        p.add_argument("--seed", type=int, default=42, help="default: 42")
        p.add_argument("--resize-width", type=int, default=None, metavar="W",
                       help="resize the image (and mask and points) to width W first, height int(h * W / w), as the "
                            "official UIs do with 512; the result is written at that size")
        _add_config_flags(p)

    pe = sub.add_parser("edit", help="drag points in an image")
    pe.add_argument("--image", required=True, help="the image to edit (a file PIL reads)")
    pe.add_argument("--drag", required=True, action="append", type=_parse_drag, metavar="HX,HY:TX,TY",
                    help="a handle and its target, image pixels (x, y); repeat for more pairs")
    pe.add_argument("--mask", default=None, help="PNG, non-zero = may change")
    pe.add_argument("--out", required=True, help="the output image (.png, .jpg, ...), written when the edit is done")
    pe.add_argument("--side-by-side", action="store_true", help="write input-with-arrows | result")
    pe.add_argument("--save-lora", default=None, metavar="DIR",
                    help="also write the fitted LoRA to DIR (diffusers' pytorch_lora_weights.safetensors + "
                         "fastdrag_lora.json)")
    pe.add_argument("--lora", default=None, metavar="DIR",
                    help="use the LoRA in DIR instead of fitting one (from --save-lora, or the official train_lora's "
                         "folder, e.g. DragBench's per-sample LoRAs; .safetensors or .bin)")
    common(pe, "runwayml/stable-diffusion-v1-5")

    pd = sub.add_parser("demo", help="a full edit on the built-in tiny model; writes a before/after PNG")
    pd.add_argument("--out", default="demo.png")
    common(pd, "tiny")

    pv = sub.add_parser("eval", help="run a method over DragBench or Drag100 and score it (resumable)")
    from .eval.command import add_eval_arguments

    add_eval_arguments(pv)

    sub.add_parser("ui", help="the web UI (pip install fastdrag[ui]); fastdrag ui --help for its options")

    pb = sub.add_parser("bench", help="benchmarks: latency per stage and the fast-path waterfall; the Triton kernels",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Run a benchmark (the package fastdrag.benchmarks; from a checkout also "
                                    "`python -m benchmarks.<name>`).")
    argv = sys.argv[1:] if argv is None else list(argv)
    bench = _add_bench_parsers(pb) if argv[:1] == ["bench"] else {}  # imported only for `fastdrag bench`

    args = ap.parse_args(_join_negative_drags(sys.argv[1:] if argv is None else list(argv)))
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
        if args.cmd == "eval":
            from .eval.command import run_eval

            return 1 if run_eval(args)["failures"] else 0
        if args.cmd == "bench":
            return bench[args.benchmark].run_main(args)
    except FastDragError as e:
        print(f"fastdrag: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; Output never leaves a half-written file
        print("fastdrag: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
