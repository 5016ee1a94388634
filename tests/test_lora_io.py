"""Saving a prepared image's LoRA (Editor.save_lora) and editing with it (lora=FOLDER) instead of fitting."""

import json
import os

import numpy as np
import pytest
import torch

import fastdrag
from fastdrag import lora as lora_mod
from fastdrag import lora_io
from tests.conftest import smooth_image

TINY = dict(lora_steps=2, lora_batch_size=1, n_pix_step=3, n_inference_step=10)
IMG = smooth_image(64, 64)
PTS = [((20, 30), (40, 34))]
PROMPT = "a ball"


@pytest.fixture
def fits(monkeypatch):
    """Counts LoRA fits."""
    calls = []
    real = lora_mod.fit_lora

    def spy(*a, **k):
        calls.append(k.get("seed"))
        return real(*a, **k)

    monkeypatch.setattr(lora_mod, "fit_lora", spy)
    return calls


@pytest.fixture
def active_lora(monkeypatch):
    """The weights each edit's preparation activates in the UNet (fitted, loaded or from the cache)."""
    seen = []
    real = lora_mod.set_lora

    def spy(unet, weights):
        seen.append(weights)
        return real(unet, weights)

    monkeypatch.setattr(lora_mod, "set_lora", spy)
    return seen


def random_lora(unet, rank: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (fan_in, fan_out) in lora_io._targets(unet).items():
        out[f"{name}.lora_A.{lora_mod.ADAPTER}.weight"] = torch.randn(rank, fan_in, generator=g)
        out[f"{name}.lora_B.{lora_mod.ADAPTER}.weight"] = torch.randn(fan_out, rank, generator=g)
    return out


def test_saved_lora_gives_the_fitted_edit_without_a_fit(tiny_model, tmp_path, fits):
    ed = fastdrag.Editor(tiny_model)
    fitted = ed.edit(IMG, PTS, prompt=PROMPT, seed=3, **TINY)
    path = ed.save_lora(tmp_path / "lora", IMG, prompt=PROMPT, seed=3, **TINY)
    assert fits == [3]  # the save took the edit's LoRA from the cache
    assert path == str(tmp_path / "lora" / lora_io.WEIGHTS_SAFE)
    info = json.loads((tmp_path / "lora" / lora_io.SIDECAR).read_text())
    assert {k: info[k] for k in ("rank", "steps", "lr", "batch_size", "seed", "prompt")} == dict(
        rank=16, steps=2, lr=5e-4, batch_size=1, seed=3, prompt=PROMPT)

    loaded = fastdrag.Editor(tiny_model).edit(IMG, PTS, prompt=PROMPT, seed=3, lora=tmp_path / "lora", **TINY)
    assert fits == [3]  # no second fit
    assert loaded.timings["lora"] == 0.0  # the stage is reported, at zero: it did not run
    assert np.array_equal(np.asarray(loaded.image), np.asarray(fitted.image))  # same process, same tensors
    assert loaded.points == fitted.points
    via_edit = fastdrag.edit(IMG, PTS, prompt=PROMPT, model=tiny_model, lora=str(tmp_path / "lora"), **TINY)
    assert np.array_equal(np.asarray(via_edit.image), np.asarray(fitted.image))


def test_the_saved_folder_is_what_diffusers_load_lora_weights_reads(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    weights = random_lora(tiny_model.unet, rank=4)
    lora_io.save_lora(tmp_path, weights, {"rank": 4})
    base = fastdrag.load_model("tiny", device="cpu")  # a UNet without fastdrag's adapter
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path), adapter_name="x")
    theirs = {n.replace(".x.", f".{lora_mod.ADAPTER}."): p for n, p in pipe.unet.named_parameters() if ".x." in n}
    assert theirs.keys() == weights.keys()
    assert all(torch.equal(theirs[n], w) for n, w in weights.items())
    scales = {m.scaling["x"] for m in pipe.unet.modules() if hasattr(m, "scaling") and "x" in m.scaling}
    assert scales == {1.0}  # scale 1, as fastdrag and the official code apply it


def _official_layouts(weights: dict) -> dict:
    """The same weights in the layouts of the official train_lora under older diffusers."""
    lora_024, procs = {}, {}
    for n, w in weights.items():
        module, side = n.split(f".lora_")[0], "down" if ".lora_A." in n else "up"
        lora_024[f"unet.{module}.lora.{side}.weight"] = w  # diffusers 0.24 (unet_lora_state_dict)
        attn, proj = (module[:-len(".to_out.0")], "to_out") if module.endswith(".to_out.0") else module.rsplit(".", 1)
        procs[f"unet.{attn}.processor.{proj}_lora.{side}.weight"] = w  # attention processors (diffusers <= 0.23)
    return {"0.24": lora_024, "procs": procs}


@pytest.mark.parametrize("layout", ["0.24", "procs"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_the_official_train_lora_layouts_read_as_the_same_weights(tiny_model, tmp_path, layout, fmt):
    weights = random_lora(tiny_model.unet, rank=16)
    sd = _official_layouts(weights)[layout]
    if fmt == "bin":
        torch.save(sd, tmp_path / lora_io.WEIGHTS_BIN)
    else:
        from safetensors.torch import save_file

        save_file(sd, tmp_path / lora_io.WEIGHTS_SAFE)
    got = lora_io.load_lora(tmp_path, tiny_model.unet)
    assert got.rank == 16 and got.info is None
    assert got.weights.keys() == weights.keys()
    assert all(torch.equal(got.weights[n], w) for n, w in weights.items())


def test_a_loaded_lora_is_keyed_by_its_content_never_by_a_fit(tiny_model, tmp_path, active_lora):
    ed = fastdrag.Editor(tiny_model)
    folder = tmp_path / "lora"
    ed.edit(IMG, PTS, prompt=PROMPT, seed=7, **TINY)  # fitted with seed 7 and cached
    for seed in (7, 8):  # the folder first holds the seed-7 fit, then is overwritten with the seed-8 one
        lora_io.save_lora(folder, random_lora(tiny_model.unet, rank=16, seed=seed), {"rank": 16})
        want = lora_io.load_lora(folder, tiny_model.unet).weights
        active_lora.clear()
        ed.edit(IMG, PTS, prompt=PROMPT, seed=7, lora=folder, **TINY)  # same image, prompt and seed as the fit
        assert active_lora and all(torch.equal(active_lora[-1][n], w) for n, w in want.items())


def test_bad_lora_folders_are_clear_errors(tiny_model, tmp_path):
    def edit(folder, **kw):
        return fastdrag.Editor(tiny_model).edit(IMG, PTS, prompt=PROMPT, lora=folder, **{**TINY, **kw})

    with pytest.raises(fastdrag.ModelLoadError, match="does not exist"):
        edit(tmp_path / "missing")
    with pytest.raises(fastdrag.ModelLoadError, match="holds neither pytorch_lora_weights.safetensors nor"):
        edit(tmp_path)
    with pytest.raises(fastdrag.ModelLoadError, match="must be the path"):
        edit(3)
    for name in (lora_io.WEIGHTS_SAFE, lora_io.WEIGHTS_BIN):
        bad = tmp_path / name.split(".")[-1]
        bad.mkdir()
        (bad / name).write_bytes(b"not a LoRA at all")
        with pytest.raises(fastdrag.ModelLoadError, match=f"could not read LoRA weights .*{name}"):
            edit(bad)

    good = random_lora(tiny_model.unet, rank=4)
    lora_io.save_lora(tmp_path / "r4", good, {"rank": 4})
    with pytest.raises(fastdrag.ConfigError, match="r4.*has rank 4, but lora_rank=16; pass lora_rank=4"):
        edit(tmp_path / "r4")
    with pytest.raises(fastdrag.ConfigError, match="lora_steps=0"):
        edit(tmp_path / "r4", lora_rank=4, lora_steps=0)

    part = {n: w for i, (n, w) in enumerate(good.items()) if i >= 2}  # one projection's pair dropped
    lora_io.save_lora(tmp_path / "part", part, {"rank": 4})
    with pytest.raises(fastdrag.ModelLoadError, match="part.*1 of its 128 adapted projections have no weights"):
        edit(tmp_path / "part", lora_rank=4)
    wide = {n: torch.zeros(4, w.shape[1] + 1) if ".lora_A." in n else w for n, w in good.items()}  # another model
    lora_io.save_lora(tmp_path / "wide", wide, {"rank": 4})
    with pytest.raises(fastdrag.ModelLoadError, match="wide.*do not fit a"):
        edit(tmp_path / "wide", lora_rank=4)

    side = tmp_path / "r4" / lora_io.SIDECAR
    side.write_text("{garbled")
    with pytest.raises(fastdrag.ModelLoadError, match="fastdrag_lora.json.*not readable JSON"):
        edit(tmp_path / "r4", lora_rank=4)
    lora_io.save_lora(tmp_path / "r4", good, {"rank": 4})
    lora_io.save_lora(tmp_path / "other", random_lora(tiny_model.unet, rank=4, seed=1), {"rank": 4})
    os.replace(tmp_path / "other" / lora_io.WEIGHTS_SAFE, tmp_path / "r4" / lora_io.WEIGHTS_SAFE)  # behind its back
    with pytest.raises(fastdrag.ModelLoadError, match="describes another pytorch_lora_weights.safetensors"):
        edit(tmp_path / "r4", lora_rank=4)


def test_save_lora_refuses_what_it_cannot_save(tiny_model, tmp_path):
    ed = fastdrag.Editor(tiny_model)
    with pytest.raises(fastdrag.ConfigError, match="nothing to save"):
        ed.save_lora(tmp_path, IMG, lora_steps=0)
    with pytest.raises(fastdrag.ConfigError, match="does not apply"):
        ed.save_lora(tmp_path, IMG, lora=tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(fastdrag.ConfigError, match="folder path"):
        ed.save_lora(tmp_path / "f", IMG, **TINY)


def test_cli_save_lora_then_lora_writes_the_same_image(tiny_model, tmp_path, capsys):
    from PIL import Image

    from fastdrag import cli

    Image.fromarray(IMG).save(tmp_path / "in.png")
    flags = ["--lora-steps", "2", "--lora-batch-size", "1", "--n-pix-step", "3", "--n-inference-step", "10"]
    common = ["edit", "--model", "tiny", "--device", "cpu", "--image", str(tmp_path / "in.png"), "--drag",
              "20,30:40,34", "--prompt", PROMPT, *flags]
    assert cli.main([*common, "--out", str(tmp_path / "a.png"), "--save-lora", str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / lora_io.WEIGHTS_SAFE).is_file()
    assert cli.main([*common, "--out", str(tmp_path / "b.png"), "--lora", str(tmp_path / "lora")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    assert "lora 0.00s" in capsys.readouterr().out
    assert cli.main([*common, "--out", str(tmp_path / "c.png"), "--lora", str(tmp_path / "nope")]) == 2
    assert "LoRA folder" in capsys.readouterr().err
