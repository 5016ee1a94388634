"""`fastdrag ui`: an interactive drag-editing web UI (gradio), on the public API only.

One model is loaded and shared by every browser session; every event that runs the engine takes the same queue slot
(concurrency_id "engine", limit 1). Each session keeps its own Editor, so a re-drag of the same image skips the LoRA
fit and the inversion. Points and the mask are drawn in the browser (fastdrag/assets/ui.js) and read from the screen
when a run starts. Offline: no share link, analytics off.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import os
import queue
import tempfile
import threading
import time
from importlib import resources

import numpy as np
from PIL import Image, ImageDraw

from .config import CONFIGS, PRESETS, make_config
from .errors import Cancelled, FastDragError, InvalidInputError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

METHODS = ["dragdiffusion", "gooddrag", "dragtext", "clipdrag"]
UPLOAD_WIDTH = 512  # as the official UIs
# The advanced panel: (field, label, integer?). Each shows only where the chosen method's config has the field.
ADVANCED = [
    ("seed", "seed", True),
    ("lora_steps", "LoRA steps", True),
    ("lora_lr", "LoRA learning rate", False),
    ("lora_rank", "LoRA rank", True),
    ("n_inference_step", "DDIM steps", True),
    ("inversion_strength", "inversion strength", False),
    ("n_pix_step", "drag steps", True),
    ("drag_end_step", "drag timesteps (GoodDrag)", True),
    ("track_per_step", "tracks per timestep (GoodDrag)", True),
    ("max_drag_per_track", "drags per track (GoodDrag)", True),
    ("latent_lr", "latent learning rate", False),
    ("lam", "λ (mask term)", False),
    ("r_m", "motion-supervision radius r_m", True),
    ("r_p", "tracking radius r_p", True),
    ("beta", "max step β", False),
    ("fuse_cof", "fusion coefficient (CLIPDrag)", False),
    ("clip_loss_coef", "CLIP loss weight (CLIPDrag)", False),
]
STAGE_ORDER = ["lora", "invert", "reference", "drag", "denoise"]
STAGE_WEIGHT = {"lora": 2.0, "invert": 1.0, "reference": 1.0, "drag": 2.0, "denoise": 2.0}  # ~UNet passes per step


# ----------------------------------------------------------------------------------------------------------
# Pure logic (tests/test_ui.py)


def fit_upload(image: Image.Image, keep_size: bool) -> Image.Image:
    """RGB, resized to width 512 keeping the aspect ratio (as the official UIs), unless keep_size."""
    image = image.convert("RGB")
    if keep_size or image.width == UPLOAD_WIDTH:
        return image
    h = max(1, round(image.height * UPLOAD_WIDTH / image.width))
    return image.resize((UPLOAD_WIDTH, h), Image.LANCZOS)


def pairs_from_points(points: list) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The clicked list [h1, t1, h2, t2, ...] (image (x, y)) -> [((hx, hy), (tx, ty)), ...]. A handle without its
    target is an error, not dropped."""
    if not points:
        raise InvalidInputError("no points: click a handle, then its target, on the image")
    if len(points) % 2:
        raise InvalidInputError(f"point {len(points)} is a handle without a target: click its target, or undo it")
    pts = [(float(p[0]), float(p[1])) for p in points]
    return [(pts[i], pts[i + 1]) for i in range(0, len(pts), 2)]


def image_to_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def data_url_to_image(url: str) -> Image.Image:
    if not isinstance(url, str) or not url.startswith("data:image/") or "," not in url:
        raise InvalidInputError("expected a data:image/...;base64 URL")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def mask_from_layer(url: str | None, size_wh: tuple[int, int]) -> np.ndarray | None:
    """The brush layer (a PNG data URL, painted pixels opaque) -> HxW bool mask (True = may change), or None."""
    if url is None:
        return None
    layer = data_url_to_image(url)
    if layer.size != tuple(size_wh):
        raise InvalidInputError(f"the mask layer is {layer.width}x{layer.height}, the image {size_wh[0]}x{size_wh[1]}")
    a = np.asarray(layer.convert("RGBA"))[..., 3]
    mask = a >= 128
    return mask if mask.any() else None


def mask_to_data_url(mask: np.ndarray | None) -> str | None:
    """HxW bool -> a PNG data URL that ui.js draws as the brush layer (white, opaque where True)."""
    if mask is None:
        return None
    rgba = np.zeros(mask.shape + (4,), np.uint8)
    rgba[mask] = 255
    return image_to_data_url(Image.fromarray(rgba, "RGBA"))


def visible_options(method: str) -> list[str]:
    fields = {f.name for f in dataclasses.fields(CONFIGS[method])} | {"seed"}
    return [name for name, _, _ in ADVANCED if name in fields]


def option_defaults(method: str, preset: str | None, overrides: dict | None = None) -> dict:
    cfg = make_config(method, preset=preset or None)
    out = {name: getattr(cfg, name) for name in visible_options(method) if name != "seed"}
    out["seed"] = 42
    out.update({k: v for k, v in (overrides or {}).items() if k in out})
    return out


def build_request(state: dict, method: str, preset: str | None, prompt: str, edit_prompt: str,
                  options: dict) -> dict:
    """The keyword arguments of Editor.edit for the canvas state and the panel's settings. Options the method's
    config lacks are left out (the panel hides them); integer options reach the engine as ints."""
    if method not in CONFIGS:
        raise InvalidInputError(f"unknown method {method!r}; expected one of {METHODS}")
    if not state or state.get("image") is None:
        raise InvalidInputError("upload an image first")
    image = state["image"]
    points = pairs_from_points(state.get("points") or [])
    mask = mask_from_layer(state.get("mask"), image.size)
    ints = {name for name, _, is_int in ADVANCED if is_int}
    kwargs = {}
    for name in visible_options(method):
        v = options.get(name)
        if v is None or v == "":
            continue
        if name in ints:
            if float(v) != int(float(v)):
                raise InvalidInputError(f"{name} must be a whole number, got {v!r}")
            v = int(float(v))
        else:
            v = float(v)
        kwargs[name] = v
    seed = kwargs.pop("seed", 42)
    if method == "clipdrag" and edit_prompt:
        kwargs["edit_prompt"] = edit_prompt
    if preset:
        kwargs["preset"] = preset
    fields = {f.name for f in dataclasses.fields(CONFIGS[method])}
    kwargs.update({k: v for k, v in (state.get("extra_options") or {}).items() if k in fields})
    return dict(image=image, points=points, mask=mask, prompt=prompt or "", method=method, seed=seed, **kwargs)


def draw_handles(image: Image.Image, pairs, handles=None) -> Image.Image:
    """The image with each pair as a numbered arrow (handle red, target blue) and, if given, the handles' positions
    (yellow): what the result view shows."""
    out = image.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    r = max(3, round(max(out.size) / 90))
    for i, ((hx, hy), (tx, ty)) in enumerate(pairs):
        d.line([(hx, hy), (tx, ty)], fill=(255, 255, 255), width=max(1, r // 2))
        d.ellipse([hx - r, hy - r, hx + r, hy + r], fill=(224, 32, 32))
        d.ellipse([tx - r, ty - r, tx + r, ty + r], fill=(32, 80, 224))
        d.text((hx + r + 1, hy - 3 * r), str(i + 1), fill=(255, 255, 255))
    for x, y in handles or []:
        d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 208, 0), outline=(0, 0, 0))
    return out


class ProgressTracker:
    """One progress fraction across the stages (LoRA, inversion, drag, denoising) and an ETA from this run's rate."""

    def __init__(self, cfg):
        n_inv = int(cfg.n_inference_step * cfg.inversion_strength)
        drag = getattr(cfg, "n_pix_step", None)
        if drag is None:
            drag = cfg.drag_end_step * cfg.track_per_step * cfg.max_drag_per_track
        self.total = {"lora": cfg.lora_steps, "invert": n_inv, "reference": getattr(cfg, "drag_end_step", 0),
                      "drag": drag, "denoise": n_inv}
        if not hasattr(cfg, "drag_end_step"):
            self.total["reference"] = 0
        self.fraction = 0.0
        self.t0 = time.perf_counter()
        self.first = None  # (time, fraction) at the first report: the rate leaves out start-up and skipped stages

    def _units(self, stage):
        return STAGE_WEIGHT[stage] * self.total[stage]

    def update(self, stage: str, step: int, total: int) -> float:
        if stage not in self.total:
            return self.fraction
        self.total[stage] = total
        all_units = sum(self._units(s) for s in STAGE_ORDER) or 1.0
        k = STAGE_ORDER.index(stage)
        done = sum(self._units(s) for s in STAGE_ORDER[:k]) + STAGE_WEIGHT[stage] * step
        self.fraction = max(self.fraction, min(1.0, done / all_units))
        if self.first is None:
            self.first = (time.perf_counter(), self.fraction)
        return self.fraction

    def eta(self) -> float | None:
        if self.first is None:
            return None
        t1, f1 = self.first
        df, dt = self.fraction - f1, time.perf_counter() - t1
        if df <= 0 or dt <= 0:
            return None
        return (1.0 - self.fraction) * dt / df


def status_html(text: str, fraction: float | None = None, error: bool = False) -> str:
    bar = "" if fraction is None else f'<progress id="fd-progress" value="{fraction:.3f}" max="1"></progress> '
    cls = "fd-error" if error else "fd-status"
    return f'<div class="{cls}" id="fd-status">{bar}{_esc(text)}</div>'


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def timings_text(timings: dict) -> str:
    parts = [f"{k} {timings.get(k, 0.0):.2f} s" for k in ("lora", "invert", "drag", "denoise", "decode")]
    skipped = [k for k in ("lora", "invert") if timings.get(k, 0.0) == 0.0]
    note = f" · skipped (cached): {', '.join('LoRA' if k == 'lora' else 'inversion' for k in skipped)}" if skipped else ""
    return " · ".join(parts) + f" · total {timings.get('total', 0.0):.2f} s" + note


def session_dict(state: dict, settings: dict, result: dict | None = None) -> dict:
    """The exported session: image, mask, points, settings and (after a run) the final handles."""
    out = {"fastdrag_session": 1, "image": image_to_data_url(state["image"]), "mask": state.get("mask"),
           "points": state.get("points") or [], "settings": settings}
    if result is not None:
        out["result"] = result
    return out


def load_session(data: dict) -> tuple[Image.Image, list, str | None, dict]:
    if not isinstance(data, dict) or data.get("fastdrag_session") != 1:
        raise InvalidInputError("not a fastdrag session file (no \"fastdrag_session\": 1)")
    image = data_url_to_image(data["image"]).convert("RGB")
    points = [[float(p[0]), float(p[1])] for p in data.get("points") or []]
    mask = data.get("mask")
    if mask is not None:
        mask_from_layer(mask, image.size)  # checks the size
    return image, points, mask, dict(data.get("settings") or {})


# ----------------------------------------------------------------------------------------------------------
# The app


def _canvas_payload(image: Image.Image, points=None, mask=None) -> str:
    return json.dumps({"src": image_to_data_url(image), "w": image.width, "h": image.height,
                       "points": points or [], "mask": mask, "nonce": time.time()})


def build_app(model, *, defaults: dict | None = None, banner: str = ""):
    import gradio as gr

    from .api import Editor

    js_code = (resources.files("fastdrag.assets") / "ui.js").read_text()
    head = f"<script>{js_code}</script>"
    css = """#fd-root .fd-bar button{margin:2px;padding:2px 8px;border:1px solid #999;border-radius:4px;background:#f4f4f4}
#fd-root .fd-bar button.fd-on{background:#ffd54a} #fd-canvas{outline:1px solid #ccc}
.fd-error{color:#b00020;font-weight:bold} #fd-progress{width:60%}"""
    defaults = dict(defaults or {})
    extra = {"clip_model": "tiny"} if getattr(model, "name", "") == "tiny" else {}  # CLIPDrag's CLIP, offline

    def new_session():
        return {"editor": Editor(model, max_cached=2), "image": None, "cancel": threading.Event(),
                "result": None, "last": None}

    def ensure(sess):
        return sess if sess is not None else new_session()

    # -- helper events (not public API)
    def on_upload(img, keep, sess):
        sess = ensure(sess)
        if img is None:
            return sess, gr.update(), "No image."
        image = fit_upload(img, keep)
        sess["image"], sess["result"] = image, None
        return sess, _canvas_payload(image), f"Image size used: {image.width}x{image.height} px"

    def on_method(method, preset_now):
        presets = sorted(PRESETS.get(method, {}))
        preset = preset_now if preset_now in presets else (presets[0] if presets else None)
        vals = option_defaults(method, preset, defaults)
        shown = set(visible_options(method))
        ups = [gr.update(choices=[""] + presets, value=preset or "")]
        ups.append(gr.update(visible=method == "clipdrag"))
        ups += [gr.update(visible=name in shown, value=vals.get(name)) for name, _, _ in ADVANCED]
        return ups

    def on_stop(sess):  # no output: a "stopping" status could land after the run's own "Stopped"
        if sess is not None:
            sess["cancel"].set()

    def on_continue(sess):
        if sess is None or sess.get("result") is None:
            return sess, gr.update(), status_html("No result to continue from: run an edit first", error=True)
        sess["image"], sess["result"] = sess["result"], None
        return sess, _canvas_payload(sess["image"]), status_html("The result is the new input; click new points.")

    def settings_of(method, preset, prompt, edit_prompt, *vals):
        return {"method": method, "preset": preset, "prompt": prompt, "edit_prompt": edit_prompt,
                "options": {name: v for (name, _, _), v in zip(ADVANCED, vals)}}

    def on_export(canvas_json, sess, method, preset, prompt, edit_prompt, *vals):
        if sess is None or sess.get("image") is None:
            return gr.update(), status_html("Nothing to export: upload an image first", error=True)
        canvas = json.loads(canvas_json or "{}")
        state = {"image": sess["image"], "points": canvas.get("points"), "mask": canvas.get("mask")}
        data = session_dict(state, settings_of(method, preset, prompt, edit_prompt, *vals), sess.get("last"))
        path = os.path.join(tempfile.mkdtemp(prefix="fastdrag-"), "session.json")
        with open(path, "w") as f:
            json.dump(data, f)
        return path, status_html("Session exported.")

    def on_import(file, sess):
        sess = ensure(sess)
        n = 6 + len(ADVANCED)
        try:
            with open(file if isinstance(file, str) else file.name) as f:
                image, points, mask, settings = load_session(json.load(f))
        except (OSError, ValueError, KeyError) as e:
            return [sess, gr.update(), status_html(f"Could not import the session: {e}", error=True)] + \
                [gr.update()] * n
        sess["image"], sess["result"] = image, None
        opts = settings.get("options", {})
        return [sess, _canvas_payload(image, points, mask), status_html("Session imported."),
                gr.update(value=settings.get("method", "dragdiffusion")), gr.update(value=settings.get("preset") or ""),
                gr.update(value=settings.get("prompt", "")), gr.update(value=settings.get("edit_prompt", "")),
                f"Image size used: {image.width}x{image.height} px", gr.update()] + \
            [gr.update(value=opts.get(name)) if name in opts else gr.update() for name, _, _ in ADVANCED]

    # -- the engine events (one queue slot)
    def run_edit(canvas_json, sess, method, preset, prompt, edit_prompt, *vals):
        """Generator: (status, live handles, result image, timings, files)."""
        none = gr.update()
        if sess is None or sess.get("image") is None:
            yield status_html("Upload an image first", error=True), none, none, none, none
            return
        try:
            canvas = json.loads(canvas_json or "{}")
            state = {"image": sess["image"], "points": canvas.get("points"), "mask": canvas.get("mask"),
                     "extra_options": extra}
            options = {name: v for (name, _, _), v in zip(ADVANCED, vals)}
            kwargs = build_request(state, method, preset or None, prompt, edit_prompt, options)
            cfg_kwargs = {k: v for k, v in kwargs.items() if k not in ("image", "points", "mask", "prompt",
                                                                       "method", "seed", "preset")}
            tracker = ProgressTracker(make_config(method, preset=preset or None, **cfg_kwargs))
        except FastDragError as e:
            yield status_html(f"Error: {e}", error=True), none, none, none, none
            return
        events: queue.Queue = queue.Queue()
        cancel = sess["cancel"]
        cancel.clear()

        def progress(p):
            if cancel.is_set():
                raise Cancelled
            events.put(("progress", p.stage, p.step, p.total, p.handles))

        def work():
            try:
                events.put(("done", sess["editor"].edit(progress=progress, **kwargs)))
            except BaseException as e:  # noqa: BLE001 -- reported to the page below
                events.put(("error", e))

        threading.Thread(target=work, daemon=True).start()
        yield status_html("Starting...", 0.0), json.dumps({"handles": None}), none, none, none
        last_yield = 0.0
        while True:
            ev = events.get()
            if ev[0] == "progress":
                _, stage, step, total, handles = ev
                frac = tracker.update(stage, step, total)
                now = time.perf_counter()
                if now - last_yield < 0.2 and step != total:
                    continue
                last_yield = now
                eta = tracker.eta()
                text = f"{stage} {step}/{total} · {100 * frac:.0f} %" + (f" · ETA {eta:.0f} s" if eta is not None
                                                                         else "")
                live = json.dumps({"handles": handles}) if handles is not None else none
                yield status_html(text, frac), live, none, none, none
                continue
            if ev[0] == "error":
                e = ev[1]
                if isinstance(e, Cancelled):
                    yield status_html("Stopped. The session is as it was before the run."), \
                        json.dumps({"handles": None}), none, none, none
                elif isinstance(e, FastDragError):
                    yield status_html(f"Error: {e}", error=True), json.dumps({"handles": None}), none, none, none
                else:
                    yield status_html(f"Internal error ({type(e).__name__}): {e}", error=True), \
                        json.dumps({"handles": None}), none, none, none
                return
            res = ev[1]
            sess["result"] = res.image
            pairs = kwargs["points"]
            sess["last"] = {"points": [list(map(list, p)) for p in pairs], "final_handles": res.points,
                            "timings": res.timings, "method": method,
                            "mask": mask_to_data_url(kwargs["mask"]), "size": list(res.image.size),
                            "options": {k: v for k, v in kwargs.items() if k not in ("image", "points", "mask")}}
            out_dir = tempfile.mkdtemp(prefix="fastdrag-")
            png = os.path.join(out_dir, "result.png")
            res.image.save(png)
            js_path = os.path.join(out_dir, "result.json")
            with open(js_path, "w") as f:
                json.dump(sess["last"], f)
            finals = ", ".join(f"({x:.0f}, {y:.0f})" for x, y in res.points)
            yield (status_html(f"Done. Final handles: {finals}", 1.0), json.dumps({"handles": res.points}),
                   draw_handles(res.image, pairs, res.points), timings_text(res.timings), [png, js_path])
            return

    def api_edit(image, points_json, mask, method, options_json):
        """HTTP endpoint: image (file), points JSON [[[hx, hy], [tx, ty]], ...], optional mask image (non-zero =
        may change), method, options JSON (prompt, seed, preset and any config field). Returns the result image and
        a JSON string with the final handles and timings."""
        try:
            opts = json.loads(options_json or "{}")
            pts = json.loads(points_json)
            m = None if mask is None else np.asarray(mask.convert("L")) > 0
            method = method or "dragdiffusion"
            if method == "clipdrag":
                opts = {**extra, **opts}
            res = api_editor.edit(image, [tuple(map(tuple, p)) for p in pts], mask=m, method=method, **opts)
        except (FastDragError, json.JSONDecodeError, TypeError) as e:
            raise gr.Error(str(e)) from None
        return res.image, json.dumps({"points": res.points, "timings": res.timings})

    api_editor = Editor(model, max_cached=2)

    with gr.Blocks(title="fastdrag", analytics_enabled=False) as app:
        sess = gr.State(None, time_to_live=6 * 3600)
        gr.Markdown("## fastdrag: drag editing" + (f"\n\n**{banner}**" if banner else ""))
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.Image(label="1. Upload an image (PNG/JPEG)", type="pil", format="png",
                                  sources=["upload", "clipboard"], image_mode="RGB", elem_id="fd-upload", height=200)
                keep = gr.Checkbox(label="keep the image's size (default: width 512, as the official UIs)", value=False)
                size_md = gr.Markdown("", elem_id="fd-size")
                gr.HTML("", elem_id="fd-editor", label="2. Click handle, target, handle, target... / paint the mask")
                gr.Markdown("Click a **handle** (red) then its **target** (blue); repeat for more pairs. "
                            "*Mask brush* paints the area that may change; no mask = the whole image may change.")
            with gr.Column(scale=1):
                result = gr.Image(label="Result (final handles in yellow)", type="pil", format="png",
                                  interactive=False, elem_id="fd-result")
                timings = gr.Textbox(label="timings", interactive=False, elem_id="fd-timings")
                files = gr.File(label="download: result PNG, points/mask/handles JSON", file_count="multiple",
                                interactive=False, elem_id="fd-files")
        with gr.Row():
            method = gr.Dropdown(METHODS, value="dragdiffusion", label="method", elem_id="fd-method")
            preset = gr.Dropdown([""], value="", label="preset", elem_id="fd-preset")
            prompt = gr.Textbox(label="prompt (describe the image)", elem_id="fd-prompt")
            edit_prompt = gr.Textbox(label="edit prompt (CLIPDrag)", visible=False, elem_id="fd-edit-prompt")
        with gr.Accordion("advanced", open=False):
            with gr.Row():
                start = option_defaults("dragdiffusion", None, defaults)
                adv = [gr.Number(value=start.get(name), label=label, precision=0 if is_int else None,
                                 visible=name in start, elem_id=f"fd-opt-{name}") for name, label, is_int in ADVANCED]
        with gr.Row():
            run_btn = gr.Button("Run", variant="primary", elem_id="fd-run")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="fd-stop")
            cont_btn = gr.Button("Continue from the result", elem_id="fd-continue")
            export_btn = gr.Button("Export session", elem_id="fd-export")
        status = gr.HTML(status_html("Ready."), elem_id="fd-status-box")
        with gr.Row():
            import_file = gr.File(label="import a session (.json)", file_types=[".json"], elem_id="fd-import")
            export_file = gr.File(label="exported session", interactive=False, elem_id="fd-export-file")
        # channels between the server and ui.js, rendered but hidden
        canvas_in = gr.Textbox(visible="hidden", elem_id="fd-canvas-in")
        canvas_state = gr.Textbox(visible="hidden", elem_id="fd-canvas-state")
        live = gr.Textbox(visible="hidden", elem_id="fd-live")
        # the HTTP endpoint's components (not shown)
        api_img = gr.Image(type="pil", format="png", visible=False)
        api_points = gr.Textbox(visible=False)
        api_mask = gr.Image(type="pil", format="png", visible=False)
        api_method = gr.Textbox(visible=False)
        api_opts = gr.Textbox(visible=False)
        api_out = gr.Image(type="pil", format="png", visible=False)
        api_info = gr.Textbox(visible=False)
        api_btn = gr.Button(visible=False)

        private = dict(api_visibility="private")
        engine = dict(concurrency_id="engine", concurrency_limit=1)
        to_canvas = dict(fn=None, inputs=[canvas_in], outputs=None, js="(j) => { window.fastdrag.setImage(j); }",
                         **private)
        upload.upload(on_upload, [upload, keep, sess], [sess, canvas_in, size_md], **private).then(**to_canvas)
        method.change(on_method, [method, preset], [preset, edit_prompt] + adv, **private)
        settings_inputs = [method, preset, prompt, edit_prompt] + adv
        read_canvas = "(...a) => { a[0] = window.fastdrag.getState(); return a; }"
        run_btn.click(run_edit, [canvas_state, sess] + settings_inputs, [status, live, result, timings, files],
                      js=read_canvas, **engine, **private)
        live.change(None, [live], None, js="(j) => { window.fastdrag.setLive(j); }", **private)
        stop_btn.click(on_stop, [sess], None, concurrency_limit=None, **private)
        cont_btn.click(on_continue, [sess], [sess, canvas_in, status], **private).then(**to_canvas)
        export_btn.click(on_export, [canvas_state, sess] + settings_inputs, [export_file, status], js=read_canvas,
                         **private)
        import_file.upload(on_import, [import_file, sess],
                           [sess, canvas_in, status, method, preset, prompt, edit_prompt, size_md, keep] + adv,
                           **private).then(**to_canvas)
        api_btn.click(api_edit, [api_img, api_points, api_mask, api_method, api_opts], [api_out, api_info],
                      api_name="edit", **engine)
    app.fastdrag_head, app.fastdrag_css = head, css
    return app


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"fastdrag ui: --set wants KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = json.loads(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastdrag ui", description="an interactive drag-editing web UI")
    ap.add_argument("--model", default="tiny", help="hub id or local diffusers folder of an SD-1.5 model; default: "
                    "the built-in tiny model (random weights: a pipeline demo only)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--device", default=None)
    ap.add_argument("--share-nothing", action="store_true", default=True,
                    help="(the default, always on) no share link, no analytics: nothing leaves the machine")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="initial value of an advanced option, e.g. --set lora_steps=10 (repeatable)")
    args = ap.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("fastdrag ui: needs gradio: pip install -c constraints.txt 'fastdrag[ui]'")
        return 2
    from .model import load_model

    try:
        model = load_model(args.model, **({"device": args.device} if args.device else {}))
    except FastDragError as e:
        print(f"fastdrag ui: error: {e}")
        return 2
    banner = ("The built-in tiny model has RANDOM weights: this shows the pipeline, not a meaningful edit. "
              "Start with --model runwayml/stable-diffusion-v1-5 (or a local SD-1.5 folder) for real edits."
              if args.model == "tiny" else "")
    app = build_app(model, defaults=parse_set(args.set), banner=banner)
    print(f"fastdrag ui: model {args.model} on {model.device}; http://{args.host}:{args.port}", flush=True)
    app.queue(default_concurrency_limit=None).launch(server_name=args.host, server_port=args.port, share=False,
                                                     head=app.fastdrag_head, css=app.fastdrag_css,
                                                     footer_links=["api"], show_error=True)
    return 0


__all__ = ["build_app", "main", "fit_upload", "pairs_from_points", "mask_from_layer", "build_request",
           "ProgressTracker", "session_dict", "load_session"]
