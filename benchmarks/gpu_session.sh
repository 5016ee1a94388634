#!/usr/bin/env bash
# Everything the GPU owes, in as few device calls as possible. On the CPU machine, once per session:
#
#     ../shared/device/wheels.sh                          # diffusers wheels -> .whl/ (git-ignored)
#     cp -r ../shared/device .gpu-tools && echo /.gpu-tools/ >> .git/info/exclude
#
# then one device call per phase (each fits in the 10-minute limit of a call), carrying .whl and .gpu-tools:
#
#     bash benchmarks/gpu_session.sh tests-kernels  # every kernel test, on CUDA tensors now
#     bash benchmarks/gpu_session.sh tests-gpu      # the GPU-only tests: capture, compile, no recompiles
#     bash benchmarks/gpu_session.sh kernels    # benchmarks.kernels --sweep-tiles -> JSON
#     bash benchmarks/gpu_session.sh latency    # benchmarks.latency --part stages --profile -> JSON (SD-1.5, random)
#     bash benchmarks/gpu_session.sh waterfall  # benchmarks.latency --part waterfall -> JSON
#
# Several phases may go in one call (`gpu_session.sh tests-kernels kernels`): a machine goes back 30 s after a
# call and a fresh one costs minutes to start, so pair the short phases. The latency parts write their JSON
# after every method / waterfall layer, so a call that hits the 10-minute limit still brings back what it
# measured ("complete": false).
#
# Logs and JSON go to $OUT (the device tool's folder that comes back), else to benchmarks/results/gpu-run/.
# Commit the JSON under benchmarks/results/ with the GPU, versions, commit and date it records.
set -o pipefail
phases=${*:-all}
for phase in $phases; do
    case $phase in
        tests-kernels|tests-gpu|tests|kernels|latency|waterfall|all) ;;
        *) echo "gpu_session.sh: unknown phase '$phase' (tests-kernels tests-gpu tests kernels latency waterfall all)" >&2
           exit 2 ;;
    esac
done
out=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$out"
if [ -f .gpu-tools/install-on-gpu.sh ]; then
    source .gpu-tools/install-on-gpu.sh || exit 1
fi
# kernels/ installs as fastdrag.kernels (setup.py); from a bare checkout, link it into place instead of installing
python3 -c "import fastdrag.kernels" 2>/dev/null || ln -sfn ../kernels fastdrag/kernels
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
rc=0
for phase in $phases; do
    case $phase in
        tests-kernels|tests|all)
            python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$out/kernel-tests.log" || rc=1 ;;
    esac
    case $phase in
        tests-gpu|tests|all)
            python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.log" || rc=1 ;;
    esac
    case $phase in
        kernels|all)
            python3 -m benchmarks.kernels --sweep-tiles --out "$out" 2>&1 | tee "$out/kernels.log" || rc=1 ;;
    esac
    case $phase in
        latency|all)
            python3 -m benchmarks.latency --part stages --profile --out "$out" 2>&1 | tee "$out/latency.log" || rc=1 ;;
    esac
    case $phase in
        waterfall|all)
            python3 -m benchmarks.latency --part waterfall --out "$out" 2>&1 | tee "$out/waterfall.log" || rc=1 ;;
    esac
done
exit $rc
