"""`fastdrag bench` once installed (issue 18, item 6): the benchmarks ship as fastdrag.benchmarks and the command
lists them with their options. Run from an install made by pip, in a folder away from the source tree, so that
nothing is imported from the checkout."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import contextlib, io, sys
import fastdrag, fastdrag.cli
print("FASTDRAG", fastdrag.__file__)
for argv in (["bench", "--help"], ["bench", "latency", "--help"], ["bench", "latency"], ["bench", "kernels"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            rc = fastdrag.cli.main(argv)
        except SystemExit as e:
            rc = e.code
    print("=== " + " ".join(argv) + f" rc={rc}")
    print(out.getvalue())
"""


def test_fastdrag_bench_works_once_installed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "setup.py", src)
    for d in ("fastdrag", "kernels", "benchmarks"):
        shutil.copytree(ROOT / d, src / d, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "results",
                                                                                         "kernels"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(src)], check=True, cwd=tmp_path, capture_output=True)
    assert (site / "fastdrag" / "benchmarks" / "latency.py").is_file() and not (site / "benchmarks").exists()
    assert "fastdrag.cli" in (site / "bin" / "fastdrag").read_text()  # the console script runs the same main
    run = tmp_path / "elsewhere"
    run.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    p = subprocess.run([sys.executable, "-c", CHILD], cwd=run, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert f"FASTDRAG {site / 'fastdrag' / '__init__.py'}" in out  # the install, not the checkout
    top, latency_help, latency_run, kernels_run = out.split("=== ")[1:]
    assert top.startswith("bench --help rc=0") and "rest" not in top
    for name, option in (("latency", "--part {all,stages,waterfall}"), ("latency", "--smoke"),
                         ("kernels", "--sweep-tiles")):
        assert f"fastdrag bench {name} [-h]" in top and option in top, top
    assert latency_help.startswith("bench latency --help rc=0") and "Latency of whole edits" in latency_help
    # the benchmarks themselves run from the install (without a GPU each says so and exits 0)
    assert latency_run.startswith("bench latency rc=0") and "no CUDA device" in latency_run, latency_run
    assert kernels_run.startswith("bench kernels rc=0") and "no CUDA device" in kernels_run, kernels_run
