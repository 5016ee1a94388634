"""Analytic FLOPs of the SD-1.x UNet (conv, linear and attention matmuls; norms and activations ignored).

Counted from a diffusers UNet2DConditionModel config, so it follows the model it is given. For SD-1.5 at a 64x64
latent it gives 401.6 GMAC = 0.80 TFLOP per forward (the spec's anchors.md derives the same figure).
"""

from __future__ import annotations


def unet_forward_macs(cfg: dict, h: int, w: int, text_len: int = 77, batch: int = 1) -> dict[str, float]:
    ch = list(cfg["block_out_channels"])
    lpb = cfg["layers_per_block"]
    d_txt = cfg["cross_attention_dim"]
    temb = ch[0] * 4
    down_types, up_types = cfg["down_block_types"], cfg["up_block_types"]
    macs = {"conv": 0.0, "linear": 0.0, "attn": 0.0}

    def conv(cin, cout, k, hh, ww):
        macs["conv"] += batch * cin * cout * k * k * hh * ww

    def lin(fin, fout, n):
        macs["linear"] += batch * fin * fout * n

    def resnet(cin, cout, hh, ww):
        conv(cin, cout, 3, hh, ww)
        lin(temb, cout, 1)
        conv(cout, cout, 3, hh, ww)
        if cin != cout:
            conv(cin, cout, 1, hh, ww)

    def transformer(c, hh, ww):
        n = hh * ww
        conv(c, c, 1, hh, ww)  # proj_in
        lin(c, 3 * c, n)  # self-attention q, k, v
        lin(c, c, n)  # out
        macs["attn"] += batch * 2 * n * n * c
        lin(c, c, n)  # cross-attention q
        lin(d_txt, 2 * c, text_len)  # k, v from the text
        lin(c, c, n)
        macs["attn"] += batch * 2 * n * text_len * c
        lin(c, 8 * c, n)  # GEGLU
        lin(4 * c, c, n)
        conv(c, c, 1, hh, ww)  # proj_out

    lin(ch[0], temb, 1)
    lin(temb, temb, 1)
    sizes = [(h >> i, w >> i) for i in range(len(ch))]
    conv(cfg["in_channels"], ch[0], 3, h, w)
    skips = [(ch[0], sizes[0])]
    cin = ch[0]
    for i, typ in enumerate(down_types):
        for _ in range(lpb):
            resnet(cin, ch[i], *sizes[i])
            cin = ch[i]
            if typ.startswith("CrossAttn"):
                transformer(ch[i], *sizes[i])
            skips.append((cin, sizes[i]))
        if i < len(ch) - 1:
            conv(cin, cin, 3, *sizes[i + 1])
            skips.append((cin, sizes[i + 1]))
    resnet(ch[-1], ch[-1], *sizes[-1])
    transformer(ch[-1], *sizes[-1])
    resnet(ch[-1], ch[-1], *sizes[-1])
    rch, rsz = ch[::-1], sizes[::-1]
    cur = ch[-1]
    for i, typ in enumerate(up_types):
        for _ in range(lpb + 1):
            sc, _ = skips.pop()
            resnet(cur + sc, rch[i], *rsz[i])
            cur = rch[i]
            if typ.startswith("CrossAttn"):
                transformer(cur, *rsz[i])
        if i < len(ch) - 1:
            conv(cur, cur, 3, *rsz[i + 1])
    conv(ch[0], cfg["out_channels"], 3, h, w)
    macs["total"] = macs["conv"] + macs["linear"] + macs["attn"]
    return macs


def drag_step_flops(cfg: dict, h: int, w: int) -> float:
    """Forward + backward to the latent only (frozen weights): forward, then the input-gradient of every conv and
    linear (same MACs) and twice the attention matmuls. 2 FLOPs per MAC."""
    m = unet_forward_macs(cfg, h, w)
    fwd = m["total"]
    bwd = m["conv"] + m["linear"] + 2 * m["attn"]
    return 2 * (fwd + bwd)
