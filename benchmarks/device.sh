#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one call of the device tool.
#
# Here (network to the package registries, ../shared at hand):
#     bash benchmarks/device.sh prepare
# copies the device's pycocotools wheel, Penn-Fudan and wheels of PyYAML, tqdm, h5py and faster-coco-eval for python3.12 into
# .device/ (git-ignored: Penn-Fudan's licence forbids committing it). Then, through the device tool, with
# carry [".device"]:
#     bash benchmarks/device.sh run compare    # the comparison table (compare_torchvision.py)
#     bash benchmarks/device.sh run accuracy   # Penn-Fudan, 200 s of training per model, then COCO AP
#     bash benchmarks/device.sh run profile    # torch.profiler of ours, batch 8 bf16 (gpu_profile.py)
#     bash benchmarks/device.sh run all        # compare, accuracy of ours alone, profile: about 7 minutes
# A device call may run 600 s at most, so `accuracy` with both models (400 s of training) needs a call of its own.
# Figures and logs go to $OUT (the device tool brings them back), or to .device/out without it; the JSON files
# there keep their names in benchmarks/results/ (compare_torchvision_cuda.json, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=.device

case "${1:-}" in
prepare)
    mkdir -p "$stage/wheels"
    cp ../shared/wheels/device/pycocotools-*.whl "$stage/wheels/"
    # faster-coco-eval: the evaluation's COCOeval, not on the device's image
    python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp --no-deps \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$stage/wheels" pyyaml tqdm h5py faster-coco-eval
    rm -rf "$stage/PennFudanPed"
    cp -r ../shared/data/PennFudanPed "$stage/PennFudanPed"
    du -sh "$stage"
    ;;
run)
    what=${2:?run compare, run accuracy, run profile or run all}
    out=${OUT:-$stage/out}
    mkdir -p "$out"
    python3 -m pip install --quiet --upgrade --no-index --no-deps --target /tmp/site "$stage"/wheels/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src" MASKRCNN_PENNFUDAN="$PWD/$stage/PennFudanPed"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
    python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/device.txt"
    compare() { python3 benchmarks/compare_torchvision.py --device cuda "$@" --json "$out/compare_torchvision_cuda.json"; }
    accuracy() { python3 benchmarks/time_to_accuracy.py --device cuda --budget 200 "$@" --json "$out/time_to_accuracy_cuda.json"; }
    profile() { python3 benchmarks/gpu_profile.py --device cuda "$@" --json "$out/gpu_profile_cuda.json"; }
    case "$what" in
    compare | accuracy | profile) "$what" "${@:3}" 2>&1 | tee "$out/$what.log" ;;
    # One call within the device's 10 minutes: the comparison, ours alone on Penn-Fudan (torchvision's 200 s run on
    # an H200 is in RESULTS.md), then the profile; each runs even when one before it failed.
    all)
        status=0
        compare 2>&1 | tee "$out/compare.log" || status=1
        accuracy --models ours 2>&1 | tee "$out/accuracy.log" || status=1
        profile 2>&1 | tee "$out/profile.log" || status=1
        exit $status
        ;;
    *) echo "run compare | run accuracy | run profile | run all" >&2; exit 2 ;;
    esac
    ;;
*)
    echo "usage: bash benchmarks/device.sh prepare | run compare|accuracy|profile|all" >&2
    exit 2
    ;;
esac
