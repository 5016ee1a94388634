import json
import os
import pickle

import numpy as np
import pytest

from fastdrag.eval import datasets as ds

from .eval_data import make_drag100, make_dragbench


def test_dragbench_layout_read_as_the_official_scripts(tmp_path):
    root = make_dragbench(tmp_path / "db")
    assert ds.detect_layout(root) == ds.DRAGBENCH
    refs = ds.scan(root)
    assert [r.id for r in refs] == ["animals/a1", "art_work/b1"]
    assert [r.category for r in refs] == ["animals", "art_work"]
    s = ds.read_sample(refs[0])
    assert s.prompt == "a photo 0"
    assert s.points == [((20.0, 24.0), (28.0, 26.0))]
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    assert s.mask.dtype == bool and s.mask.sum() == 32 * 32 and s.mask[16, 16] and not s.mask[0, 0]


def test_drag100_layout_real_file_format(tmp_path):
    root = make_drag100(tmp_path / "d100")
    # the real cat_2/points.json's exact text format, with points that fit this 72x72 image
    with open(os.path.join(root, "cat_2", "points.json"), "w") as f:
        f.write('{"points": [[47, 17], [52, 16], [10, 18], [16, 14]]}')
    assert ds.detect_layout(root) == ds.DRAG100
    refs = ds.scan(root)
    assert [r.id for r in refs] == ["cat_2", "furniture_0"] and refs[0].category is None
    s = ds.read_sample(refs[0])
    assert s.points == [((47.0, 17.0), (52.0, 16.0)), ((10.0, 18.0), (16.0, 14.0))]
    assert s.prompt == "" and s.mask.shape == (72, 72) and s.mask[10, 10] and not s.mask[0, 0]


def test_empty_and_unknown_folders_are_errors(tmp_path):
    with pytest.raises(ds.DatasetError, match="empty"):
        ds.detect_layout(str(tmp_path))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    with pytest.raises(ds.DatasetError, match="neither DragBench"):
        ds.detect_layout(str(tmp_path))
    with pytest.raises(ds.DatasetError, match="does not exist"):
        ds.detect_layout(str(tmp_path / "nope"))


def test_mixed_layouts_are_an_error(tmp_path):
    make_drag100(tmp_path, names=("s0",))
    make_dragbench(tmp_path, samples=(("animals", "a1", 0),))
    with pytest.raises(ds.DatasetError, match="mixes"):
        ds.detect_layout(str(tmp_path))


def _rewrite_meta(root, sample, **kw):
    p = os.path.join(root, sample, "meta_data.pkl")
    with open(p, "rb") as f:
        meta = pickle.load(f)
    meta.update(kw)
    with open(p, "wb") as f:
        pickle.dump(meta, f)


@pytest.mark.parametrize("change, match", [
    (dict(points=[(20, 24), (28, 26), (30, 30)]), "3 points.*even"),
    (dict(points=[(20, 24, 1), (28, 26)]), r"\[x, y\] pairs"),
    (dict(points=[]), "no points"),
    (dict(points=[(20, 24), (90, 26)]), "outside the 64x64"),
    (dict(mask=np.ones((32, 64), np.uint8)), r"shape \(32, 64\)"),
    (dict(prompt=None), "prompt must be a string"),
])
def test_bad_dragbench_sample_names_sample_and_problem(tmp_path, change, match):
    root = make_dragbench(tmp_path / "db")
    _rewrite_meta(root, "art_work/b1", **change)
    with pytest.raises(ds.DatasetError, match=match) as e:
        ds.check_dataset(root)
    assert "'art_work/b1'" in str(e.value)


def test_missing_file_names_the_first_bad_sample(tmp_path):
    root = make_drag100(tmp_path / "d100", names=("a", "b", "c"))
    os.remove(os.path.join(root, "b", "mask.png"))
    os.remove(os.path.join(root, "c", "points.json"))
    with pytest.raises(ds.DatasetError, match="sample 'b': missing mask.png"):
        ds.check_dataset(root)
    refs = ds.scan(root)
    assert [r.id for r in refs] == ["a", "b", "c"]  # listed, not dropped: the run reports them as failed
    with pytest.raises(ds.DatasetError, match="sample 'c': missing points.json"):
        ds.read_sample(refs[2])


def test_drag100_bad_points_json(tmp_path):
    root = make_drag100(tmp_path / "d100", names=("a",))
    p = os.path.join(root, "a", "points.json")
    with open(p, "w") as f:
        json.dump({"pts": []}, f)
    with pytest.raises(ds.DatasetError, match="sample 'a'.*points.json must be"):
        ds.check_dataset(root)
    with open(p, "w") as f:
        f.write("{not json")
    with pytest.raises(ds.DatasetError, match="not valid JSON"):
        ds.check_dataset(root)


def test_lora_folder_official_tree(tmp_path):
    root = make_dragbench(tmp_path / "db", lora=True)
    refs = ds.scan(root)
    assert ds.lora_folder(root + "_lora", refs[0], 80) == os.path.join(root + "_lora", "animals", "a1", "80")
    with pytest.raises(ds.DatasetError, match="no LoRA folder"):
        ds.lora_folder(root + "_lora", refs[0], 70)
