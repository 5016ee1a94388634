"""`fastdrag ui` end to end in a real headless Chromium (Debian's, driven by Playwright through executable_path).

The app runs in a subprocess on a free port, on the tiny model with tiny settings, and is stopped by its pid when
the module's tests end, also when one fails. Skipped only where chromium or playwright is missing AND not in CI (CI
sets CI=...: there they must run)."""

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import smooth_image

CHROMIUM = os.environ.get("FASTDRAG_CHROMIUM", "/usr/bin/chromium")
SETTINGS = ["lora_steps=1", "n_pix_step=2", "n_inference_step=10"]
ROOT = Path(__file__).resolve().parent.parent


def _need_browser():
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
        import gradio  # noqa: F401
    except ImportError as e:
        missing.append(str(e))
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI: the browser tests need {missing}")
        pytest.skip(f"browser tests need {missing}")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    _need_browser()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("ui") / "app.log"
    cmd = [sys.executable, "-m", "fastdrag", "ui", "--model", "tiny", "--port", str(port)]
    for item in SETTINGS:
        cmd += ["--set", item]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()}")
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"the app did not start in 300 s:\n{log.read_text()}")
                time.sleep(1)
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def browser(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


def _page(browser, url, width=640):
    ctx = browser.new_context(viewport={"width": width, "height": 1400})
    page = ctx.new_page()
    page.goto(url)
    page.wait_for_selector("#fd-canvas", timeout=120_000)
    return page


def _upload(page, path, keep=True):
    w, h = Image.open(path).size
    if keep:
        page.locator("label:has-text(\"keep the image's size\") input").check()
    page.set_input_files("#fd-upload input[type=file]", str(path))
    page.wait_for_function(f"window.fastdrag.state.w === {w} && window.fastdrag.state.img !== null", timeout=120_000)


def _scale(page):
    page.locator("#fd-canvas").scroll_into_view_if_needed()  # mouse coordinates are the viewport's
    box = page.locator("#fd-canvas").bounding_box()
    return box, box["width"] / page.evaluate("window.fastdrag.state.w")


def _click(page, x, y):
    """Click the displayed image where image pixel (x, y) is (its centre)."""
    box, s = _scale(page)
    page.mouse.click(box["x"] + (x + 0.5) * s, box["y"] + (y + 0.5) * s)


def _stroke(page, a, b):
    page.click("#fd-mode-mask")
    box, s = _scale(page)
    page.mouse.move(box["x"] + (a[0] + 0.5) * s, box["y"] + (a[1] + 0.5) * s)
    page.mouse.down()
    for t in np.linspace(0, 1, 8):
        page.mouse.move(box["x"] + (a[0] + t * (b[0] - a[0]) + 0.5) * s, box["y"] + (a[1] + t * (b[1] - a[1]) + 0.5) * s)
    page.mouse.up()
    page.click("#fd-mode-points")


def _start(page):
    page.evaluate("document.querySelector('#fd-status').textContent = 'clicked'")  # not the last run's status
    page.click("#fd-run")


def _run(page, expect="Done"):
    _start(page)
    page.wait_for_function("(() => { const t = document.querySelector('#fd-status');"
                           " return t && /Done|Error|error|Stopped/.test(t.textContent); })()", timeout=300_000)
    text = page.locator("#fd-status").inner_text()
    assert expect in text, text
    return text


def _result_files(page):
    links = page.locator("#fd-files a")
    links.first.wait_for(timeout=60_000)
    out = {}
    for i in range(links.count()):
        href = links.nth(i).get_attribute("href")
        body = page.request.get(href).body()
        out[href.rsplit("/", 1)[-1].split("?")[0]] = body
    return out


def _result(page):
    files = _result_files(page)
    info = json.loads(next(v for k, v in files.items() if k.endswith(".json")))
    png = Image.open(io.BytesIO(next(v for k, v in files.items() if k.endswith(".png"))))
    return info, png


def _wait_new_result(page, before):
    page.wait_for_function(f"(() => {{ const a = document.querySelector('#fd-files a');"
                           f" return a && a.getAttribute('href') !== {json.dumps(before)}; }})()", timeout=60_000)


def _href(page):
    a = page.locator("#fd-files a")
    return a.first.get_attribute("href") if a.count() else None


@pytest.fixture(scope="module")
def wide_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "wide.png"
    Image.fromarray(smooth_image(128, 384, seed=1)).save(path)  # 3:1, shown scaled to the column's width
    return path


def test_edit_redrag_and_what_the_engine_received(browser, app_url, wide_png, tmp_path):
    page = _page(browser, app_url, width=1280)
    _upload(page, wide_png)
    assert "384x128" in page.locator("#fd-size").inner_text()
    box, s = _scale(page)
    assert abs(s - 1) > 0.15, s  # the image is displayed scaled
    assert box["width"] / box["height"] == pytest.approx(3.0, rel=0.02)  # and unstretched
    pairs = [((60, 40), (90, 40)), ((250, 80), (280, 70))]
    for h, t in pairs:
        _click(page, *h)
        _click(page, *t)
    _stroke(page, (20, 20), (120, 20))
    _run(page)
    info, png = _result(page)
    assert info["points"] == [[list(h), list(t)] for h, t in pairs]  # exact image pixels, through the scaling
    assert info["mask"] is not None, "the engine got no mask"
    m = np.asarray(Image.open(io.BytesIO(base64.b64decode(info["mask"].split(",", 1)[1]))).convert("L")) > 0
    assert m.shape == (128, 384) and m[16:25, 22:118].all()  # the stroke, brush radius 10 px
    assert not m[:, 140:].any() and not m[40:].any()  # and nothing else
    assert png.size == (384, 128) and info["timings"]["lora"] > 0 and info["timings"]["invert"] > 0
    assert len(info["final_handles"]) == 2
    assert page.locator("#fd-result img").count() == 1
    assert "total" in page.locator("#fd-timings textarea").input_value()
    assert "Final handles" in page.locator("#fd-status").inner_text()
    shot = os.environ.get("FASTDRAG_UI_SCREENSHOT") or str(tmp_path / "ui.png")  # the README's is docs/ui.png
    page.screenshot(path=shot, full_page=True)
    print(f"screenshot: {shot}")

    # Re-drag the same image with other points: the session's Editor skips the LoRA fit and the inversion.
    before = _href(page)
    page.click("#fd-clear-points")
    _click(page, 200, 60)
    _click(page, 230, 64)
    _run(page)
    _wait_new_result(page, before)
    info2, _ = _result(page)
    assert info2["points"] == [[[200, 60], [230, 64]]]
    assert info2["timings"]["lora"] == 0 and info2["timings"]["invert"] == 0
    assert "skipped (cached): LoRA, inversion" in page.locator("#fd-timings textarea").input_value()
    page.context.close()


def test_invalid_requests_show_the_error_and_the_app_stays_usable(browser, app_url, wide_png):
    page = _page(browser, app_url)
    _upload(page, wide_png)
    _click(page, 100, 50)
    _click(page, 100, 50)
    assert "handle 0 equals its target" in _run(page, "Error")
    page.click("#fd-undo")  # a half pair cannot run
    assert "handle without a target" in _run(page, "Error")
    page.click("#fd-clear-points")
    _click(page, 100, 50)
    _click(page, 130, 50)
    _run(page)
    info, _ = _result(page)
    assert info["points"] == [[[100, 50], [130, 50]]]
    page.context.close()


def test_two_sessions_at_once_get_their_own_results(browser, app_url, tmp_path, tiny_model):
    import fastdrag

    pages, jobs = [], []
    for seed, pair in ((2, ((30, 30), (60, 40))), (3, ((80, 70), (50, 60)))):
        path = tmp_path / f"img{seed}.png"
        Image.fromarray(smooth_image(96, 128, seed=seed)).save(path)
        page = _page(browser, app_url)
        _upload(page, path)
        _click(page, *pair[0])
        _click(page, *pair[1])
        pages.append(page)
        jobs.append((path, pair))
    for page in pages:
        _start(page)  # both queued at once; the engine runs them one after the other
    for page, (path, pair) in zip(pages, jobs):
        page.wait_for_function("/Done|Error|error/.test(document.querySelector('#fd-status').textContent)",
                               timeout=300_000)
        info, png = _result(page)
        assert info["points"] == [[list(pair[0]), list(pair[1])]]
        alone = fastdrag.Editor(tiny_model).edit(Image.open(path).convert("RGB"), [pair], seed=42, lora_steps=1,
                                                 n_pix_step=2, n_inference_step=10)
        assert np.abs(np.asarray(png, np.int16) - np.asarray(alone.image, np.int16)).mean() < 0.5
        assert np.allclose(info["final_handles"], alone.points)
        page.context.close()


def test_http_endpoint_is_the_only_public_one(app_url, tmp_path):
    from gradio_client import Client, handle_file

    path = tmp_path / "in.png"
    Image.fromarray(smooth_image(96, 128, seed=4)).save(path)
    client = Client(app_url, verbose=False)
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/edit"]
    out, info = client.predict(handle_file(str(path)), "[[[30, 30], [60, 40]]]", None, "dragdiffusion",
                               json.dumps({"lora_steps": 1, "n_pix_step": 2, "n_inference_step": 10}), api_name="/edit")
    assert Image.open(out).size == (128, 96)
    assert len(json.loads(info)["points"]) == 1
    with pytest.raises(Exception, match="equals its target"):
        client.predict(handle_file(str(path)), "[[[30, 30], [30, 30]]]", None, "dragdiffusion", "{}", api_name="/edit")


def _data_url_array(url):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def test_stop_continue_export_import(browser, app_url, tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(smooth_image(96, 128, seed=5)).save(path)
    page = _page(browser, app_url)
    _upload(page, path)
    _click(page, 30, 30)
    _click(page, 70, 40)
    page.get_by_text("advanced").click()
    steps = page.locator("#fd-opt-n_pix_step input")
    steps.fill("2000")
    steps.press("Tab")
    _start(page)
    page.wait_for_function("/drag \\d+\\/2000/.test(document.querySelector('#fd-status').textContent)",
                           timeout=300_000)
    page.click("#fd-stop")
    page.wait_for_function("/Stopped/.test(document.querySelector('#fd-status').textContent)", timeout=120_000)
    steps.fill("2")
    steps.press("Tab")
    _run(page)
    info, png = _result(page)
    assert info["timings"]["lora"] > 0  # the stopped run left no cache entry behind

    page.click("#fd-continue")  # the result becomes the input
    page.wait_for_function("window.fastdrag.state.points.length === 0 && window.fastdrag.state.img.src !== ''")
    page.wait_for_function("document.querySelector('#fd-status').textContent.includes('new input')")
    assert np.array_equal(_data_url_array(page.evaluate("window.fastdrag.state.img.src")), np.asarray(png.convert("RGB")))
    _click(page, 50, 50)
    _click(page, 80, 50)
    page.click("#fd-export")
    link = page.locator("#fd-export-file a")
    link.first.wait_for(timeout=60_000)
    data = json.loads(page.request.get(link.first.get_attribute("href")).body())
    assert data["points"] == [[50, 50], [80, 50]] and data["settings"]["options"]["n_pix_step"] == 2
    assert np.array_equal(_data_url_array(data["image"]), np.asarray(png.convert("RGB")))
    saved = tmp_path / "session.json"
    saved.write_text(json.dumps(data))
    page.context.close()

    other = _page(browser, app_url)
    other.set_input_files("#fd-import input[type=file]", str(saved))
    other.wait_for_function("window.fastdrag.state.points.length === 2", timeout=120_000)
    assert other.evaluate("window.fastdrag.state.points") == [[50, 50], [80, 50]]
    assert np.array_equal(_data_url_array(other.evaluate("window.fastdrag.state.img.src")),
                          np.asarray(png.convert("RGB")))
    other.context.close()
