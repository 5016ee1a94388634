// fastdrag ui: the editing view. Points and the mask live here, in the browser, so that no click waits for the
// server (a point list redrawn on the server loses the clicks that land while the image reloads). The canvas holds
// the image at its own pixel size and CSS scales it to fit, so any aspect ratio shows unstretched and uncropped;
// clicks map back to image pixels through the displayed size.
window.fastdrag = (() => {
  const S = {img: null, w: 0, h: 0, points: [], mode: "points", brush: 10, mask: null, painted: false,
             live: null, down: false, last: null};
  let root = null, view = null, info = null;

  // display (client) coordinates -> image pixel (x, y): pixel index along each axis, in [0, w) x [0, h); rect is
  // the canvas's content box (inside any border)
  function toImage(clientX, clientY, rect, w, h) {
    const x = Math.floor((clientX - rect.left) * w / rect.width);
    const y = Math.floor((clientY - rect.top) * h / rect.height);
    return [Math.min(Math.max(x, 0), w - 1), Math.min(Math.max(y, 0), h - 1)];
  }

  function contentRect() {
    const r = view.getBoundingClientRect();
    return {left: r.left + view.clientLeft, top: r.top + view.clientTop, width: view.clientWidth, height: view.clientHeight};
  }

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => e.setAttribute(k, v));
    if (text) e.textContent = text;
    return e;
  }

  function mount() {
    if (root && document.body.contains(root)) return true;
    const host = document.getElementById("fd-editor");
    if (!host) return false;
    root = el("div", {id: "fd-root"});
    const bar = el("div", {class: "fd-bar"});
    const btn = (id, text, fn) => { const b = el("button", {id, type: "button"}, text); b.onclick = fn; bar.appendChild(b); return b; };
    btn("fd-mode-points", "Points", () => setMode("points"));
    btn("fd-mode-mask", "Mask brush", () => setMode("mask"));
    const size = el("input", {id: "fd-brush", type: "range", min: "2", max: "60", value: String(S.brush)});
    size.oninput = () => { S.brush = +size.value; };
    bar.appendChild(el("span", {}, " brush ")); bar.appendChild(size);
    btn("fd-undo", "Undo point", () => { S.points.pop(); draw(); });
    btn("fd-clear-points", "Clear points", () => { S.points = []; draw(); });
    btn("fd-clear-mask", "Clear mask", () => { clearMask(); draw(); });
    root.appendChild(bar);
    view = el("canvas", {id: "fd-canvas", width: "512", height: "256"});
    view.style.width = "100%"; view.style.height = "auto"; view.style.touchAction = "none";  // scaled to fit
    view.style.display = "block"; view.style.cursor = "crosshair";
    view.addEventListener("pointerdown", onDown);
    view.addEventListener("pointermove", onMove);
    window.addEventListener("pointerup", () => { S.down = false; S.last = null; });
    root.appendChild(view);
    info = el("div", {id: "fd-info"}, "Upload an image to start.");
    root.appendChild(info);
    host.appendChild(root);
    setMode(S.mode);
    draw();
    return true;
  }

  function setMode(m) {
    S.mode = m;
    if (!root) return;
    root.querySelector("#fd-mode-points").classList.toggle("fd-on", m === "points");
    root.querySelector("#fd-mode-mask").classList.toggle("fd-on", m === "mask");
  }

  function clearMask() {
    if (!S.mask) return;
    S.mask.getContext("2d").clearRect(0, 0, S.w, S.h);
    S.painted = false;
  }

  function paint(p) {
    const c = S.mask.getContext("2d");
    c.fillStyle = "#fff"; c.strokeStyle = "#fff"; c.lineCap = "round"; c.lineWidth = 2 * S.brush;
    if (S.last) { c.beginPath(); c.moveTo(S.last[0] + .5, S.last[1] + .5); c.lineTo(p[0] + .5, p[1] + .5); c.stroke(); }
    c.beginPath(); c.arc(p[0] + .5, p[1] + .5, S.brush, 0, 2 * Math.PI); c.fill();
    S.last = p; S.painted = true;
  }

  function onDown(e) {
    if (!S.img) return;
    const p = toImage(e.clientX, e.clientY, contentRect(), S.w, S.h);
    if (S.mode === "points") { S.points.push(p); S.live = null; }
    else { S.down = true; S.last = null; paint(p); view.setPointerCapture(e.pointerId); }
    draw();
  }

  function onMove(e) {
    if (!S.down || S.mode !== "mask") return;
    paint(toImage(e.clientX, e.clientY, contentRect(), S.w, S.h));
    draw();
  }

  function arrow(c, a, b, color, lw) {
    c.strokeStyle = color; c.fillStyle = color; c.lineWidth = lw;
    c.beginPath(); c.moveTo(a[0], a[1]); c.lineTo(b[0], b[1]); c.stroke();
    const ang = Math.atan2(b[1] - a[1], b[0] - a[0]), L = 4 * lw + 4;
    c.beginPath(); c.moveTo(b[0], b[1]);
    c.lineTo(b[0] - L * Math.cos(ang - 0.45), b[1] - L * Math.sin(ang - 0.45));
    c.lineTo(b[0] - L * Math.cos(ang + 0.45), b[1] - L * Math.sin(ang + 0.45));
    c.closePath(); c.fill();
  }

  function dot(c, p, color, r) {
    c.fillStyle = color; c.beginPath(); c.arc(p[0] + .5, p[1] + .5, r, 0, 2 * Math.PI); c.fill();
    c.strokeStyle = "#fff"; c.lineWidth = Math.max(1, r / 3); c.stroke();
  }

  function draw() {
    if (!view) return;
    const c = view.getContext("2d");
    if (!S.img) { c.fillStyle = "#eee"; c.fillRect(0, 0, view.width, view.height); return; }
    c.drawImage(S.img, 0, 0);
    if (S.painted) {  // the mask tinted over the image
      const t = document.createElement("canvas"); t.width = S.w; t.height = S.h;
      const tc = t.getContext("2d");
      tc.drawImage(S.mask, 0, 0); tc.globalCompositeOperation = "source-in";
      tc.fillStyle = "rgba(40, 120, 255, 0.4)"; tc.fillRect(0, 0, S.w, S.h);
      c.drawImage(t, 0, 0);
    }
    const r = Math.max(3, Math.round(Math.max(S.w, S.h) / 90)), lw = Math.max(1.5, r / 2);
    c.font = `bold ${3 * r}px sans-serif`;
    for (let i = 0; i < S.points.length; i += 2) {
      const h = S.points[i], t = S.points[i + 1];
      if (t) arrow(c, h, t, "rgba(255,255,255,0.9)", lw);
      dot(c, h, "#e02020", r);
      if (t) dot(c, t, "#2050e0", r);
      c.fillStyle = "#fff"; c.strokeStyle = "#000"; c.lineWidth = 2;
      c.strokeText(String(i / 2 + 1), h[0] + r + 1, h[1] - r - 1); c.fillText(String(i / 2 + 1), h[0] + r + 1, h[1] - r - 1);
    }
    if (S.live) S.live.forEach((p) => dot(c, [Math.round(p[0]), Math.round(p[1])], "#ffd000", r));
    const n = S.points.length;
    info.textContent = `${S.w}x${S.h} px · ${Math.floor(n / 2)} pair(s)` + (n % 2 ? " + a handle without a target" : "") +
      ` · mask: ${S.painted ? "painted" : "none (the whole image may change)"} · mode: ${S.mode}`;
  }

  function setImage(json) {
    if (!json) return;
    const d = typeof json === "string" ? JSON.parse(json) : json;
    mount();
    const img = new Image();
    img.onload = () => {
      S.img = img; S.w = d.w; S.h = d.h; view.width = d.w; view.height = d.h;
      S.points = (d.points || []).map((p) => [p[0], p[1]]); S.live = null;
      S.mask = document.createElement("canvas"); S.mask.width = d.w; S.mask.height = d.h; S.painted = false;
      if (d.mask) {
        const m = new Image();
        m.onload = () => { S.mask.getContext("2d").drawImage(m, 0, 0); S.painted = true; draw(); };
        m.src = d.mask;
      }
      draw();
    };
    img.src = d.src;
  }

  // The state a run or an export reads, at the moment it is asked for: what is on screen.
  function getState() {
    return JSON.stringify({w: S.w, h: S.h, points: S.points,
                           mask: S.painted ? S.mask.toDataURL("image/png") : null});
  }

  function setLive(json) {
    if (!json) return;
    const d = JSON.parse(json);
    S.live = d.handles || null;
    draw();
  }

  const boot = setInterval(() => { if (mount()) clearInterval(boot); }, 100);
  return {toImage, setImage, getState, setLive, setMode, state: S};
})();
