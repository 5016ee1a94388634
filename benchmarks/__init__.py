"""Benchmarks. From a checkout: `python -m benchmarks.latency`, `python -m benchmarks.kernels`; installed, this
package is `fastdrag.benchmarks` (setup.py's package_dir, as kernels/ is fastdrag.kernels) and `fastdrag bench
latency|kernels [options]` runs the same mains."""
