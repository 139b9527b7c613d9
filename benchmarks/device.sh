#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one call of the device tool.
#
# Here (network to the package registries, ../shared at hand):
#     bash benchmarks/device.sh prepare
# copies the device's pycocotools wheel, Penn-Fudan and wheels of PyYAML, tqdm and h5py for python3.12 into
# .device/ (git-ignored: Penn-Fudan's licence forbids committing it). Then, through the device tool, with
# carry [".device"]:
#     bash benchmarks/device.sh run compare    # the comparison table (compare_torchvision.py)
#     bash benchmarks/device.sh run accuracy   # Penn-Fudan, 200 s of training per model, then COCO AP
# Two calls, since the second alone trains for 400 s and a device call may run 600 s at most.
# Figures and logs go to $OUT (the device tool brings them back), or to .device/out without it.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=.device

case "${1:-}" in
prepare)
    mkdir -p "$stage/wheels"
    cp ../shared/wheels/device/pycocotools-*.whl "$stage/wheels/"
    python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp --no-deps \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$stage/wheels" pyyaml tqdm h5py
    rm -rf "$stage/PennFudanPed"
    cp -r ../shared/data/PennFudanPed "$stage/PennFudanPed"
    du -sh "$stage"
    ;;
run)
    what=${2:?run compare or run accuracy}
    out=${OUT:-$stage/out}
    mkdir -p "$out"
    python3 -m pip install --quiet --no-index --no-deps --target /tmp/site "$stage"/wheels/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src" MASKRCNN_PENNFUDAN="$PWD/$stage/PennFudanPed"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
    python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/device.txt"
    case "$what" in
    compare) python3 benchmarks/compare_torchvision.py --device cuda --json "$out/compare_torchvision_cuda.json" ;;
    accuracy) python3 benchmarks/time_to_accuracy.py --device cuda --budget 200 --json "$out/time_to_accuracy_cuda.json" ;;
    *) echo "run compare | run accuracy" >&2; exit 2 ;;
    esac 2>&1 | tee "$out/$what.log"
    ;;
*)
    echo "usage: bash benchmarks/device.sh prepare | run compare | run accuracy" >&2
    exit 2
    ;;
esac
