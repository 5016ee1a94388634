"""`fastdrag eval` end to end on the tiny model: outputs, resume, refused config change, failures reported."""

import json
import os
import pickle

import pytest

from fastdrag import cli
from fastdrag.eval import store

from .eval_data import make_drag100, make_dragbench

TINY = ["--model", "tiny", "--device", "cpu", "--lora-steps", "1", "--n-pix-step", "1", "--n-inference-step", "4",
        "--inversion-strength", "0.5"]


def run(dataset, out, *extra):
    return cli.main(["eval", str(dataset), "--out", str(out), *TINY, *extra])


def files(out):
    got = {}
    for root, _, names in os.walk(out):
        for n in names:
            p = os.path.join(root, n)
            got[os.path.relpath(p, out)] = os.path.getmtime(p)
    return got


@pytest.fixture(scope="module")
def drag100_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    data = make_drag100(tmp / "d100")
    out = tmp / "run"
    assert run(data, out) == 0
    return data, out


def test_outputs_of_a_run(drag100_run):
    data, out = drag100_run
    for sid in ("cat_2", "furniture_0"):
        d = store.sample_dir(str(out), sid)
        rec = store.read_json(os.path.join(d, "result.json"))
        assert rec["status"] == "done" and rec["seed"] == 42 and len(rec["final_handles"]) == 2
        assert set(rec["timings"]) >= {"lora", "invert", "drag", "denoise", "decode", "total"}
        m = store.read_json(os.path.join(d, "metrics.json"))["dai"]["values"]
        assert set(m) == {f"dai_{k}_r{r}" for k in ("official", "per_pair") for r in (1, 5, 10, 20)}
        assert m["dai_official_r1"] == pytest.approx(m["dai_per_pair_r1"] / 2)
    s = store.read_json(os.path.join(out, "summary.json"))
    assert s["counts"] == {"samples": 2, "done": 2, "failed": 0, "pending": 0}
    assert s["metrics"]["dai_official_r5"]["n"] == 2
    assert s["config"]["config"]["lora_steps"] == 1 and s["config"]["layout"] == "drag100"
    assert os.path.exists(os.path.join(out, "grid.png")) and "dai_official_r1" in open(out / "summary.md").read()
    assert not [f for f in files(out) if f.endswith(".tmp")]


def test_rerun_skips_everything_done(drag100_run, capsys):
    data, out = drag100_run
    before = files(out)
    assert run(data, out) == 0
    after = files(out)
    for f, t in before.items():
        if f.startswith("samples"):
            assert after[f] == t, f"{f} was rewritten by a resumed run"
    assert "0 to edit" in capsys.readouterr().err


def test_changed_config_is_refused(drag100_run, capsys):
    data, out = drag100_run
    assert cli.main(["eval", str(data), "--out", str(out), *TINY, "--latent-lr", "0.02"]) == 2
    err = capsys.readouterr().err
    assert "another config" in err and "latent_lr" in err


def test_bad_samples_are_reported_not_fatal(tmp_path):
    data = make_dragbench(tmp_path / "db", samples=(("animals", "a1", 0), ("animals", "a2", 1),
                                                     ("art_work", "b1", 2)))
    with open(os.path.join(data, "animals", "a2", "meta_data.pkl"), "rb") as f:
        meta = pickle.load(f)
    meta["points"] = meta["points"] + [(1, 1)]
    with open(os.path.join(data, "animals", "a2", "meta_data.pkl"), "wb") as f:
        pickle.dump(meta, f)
    os.remove(os.path.join(data, "art_work", "b1", "original_image.png"))
    out = tmp_path / "run"
    assert run(data, out, "--metrics", "") == 1  # failures make the exit status non-zero
    s = json.load(open(out / "summary.json"))
    assert s["counts"] == {"samples": 3, "done": 1, "failed": 2, "pending": 0}
    errors = {f["id"]: f["error"] for f in s["failures"]}
    assert "3 points" in errors["animals/a2"] and "missing original_image.png" in errors["art_work/b1"]
    assert "animals/a2" in open(out / "summary.md").read()


def test_sample_lora_passed_to_the_edit(tmp_path, monkeypatch):
    import fastdrag

    seen = []

    class LoraEditor(fastdrag.Editor):
        def edit(self, image, points, *, lora=None, **kw):
            seen.append(lora)
            return super().edit(image, points, **kw)

    monkeypatch.setattr(fastdrag, "Editor", LoraEditor)
    data = make_dragbench(tmp_path / "db", samples=(("animals", "a1", 0),), lora=True)
    out = tmp_path / "run"
    assert run(data, out, "--metrics", "", "--sample-lora", data + "_lora", "--sample-lora-steps", "80") == 0
    assert seen == [os.path.join(data + "_lora", "animals", "a1", "80")]
    assert store.read_json(os.path.join(out, "run.json"))["sample_lora_steps"] == 80


def test_sample_lora_needs_an_editor_that_takes_lora(tmp_path, capsys, monkeypatch):
    import fastdrag

    class OldEditor(fastdrag.Editor):  # an installed fastdrag from before lora=
        def edit(self, image, points, **kw):
            raise AssertionError("must be refused before any edit")

    monkeypatch.setattr(fastdrag, "Editor", OldEditor)
    data = make_dragbench(tmp_path / "db", samples=(("animals", "a1", 0),), lora=True)
    assert run(data, tmp_path / "run", "--sample-lora", data + "_lora") == 2
    assert "--sample-lora needs a fastdrag whose Editor.edit accepts lora=FOLDER" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written


def test_score_phase_alone_resumes_and_retries_errors(drag100_run, capsys):
    data, out = drag100_run
    mpath = os.path.join(store.sample_dir(str(out), "cat_2"), "metrics.json")
    kept = os.path.getmtime(os.path.join(store.sample_dir(str(out), "furniture_0"), "metrics.json"))
    stored = store.read_json(mpath)
    store.atomic_write_json(mpath, {"dai": {"error": "InvalidInputError: from an earlier run"}})
    assert run(data, out, "--phase", "score") == 0
    assert "scoring dai on 1 samples" in capsys.readouterr().err  # the errored one only; nothing edited
    assert store.read_json(mpath) == stored
    assert os.path.getmtime(os.path.join(store.sample_dir(str(out), "furniture_0"), "metrics.json")) == kept
