#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one call of the device tool (issue 35's protocol, gpu_protocol.py).
#
# Here (network to the package registries, ../shared at hand), right before the device call:
#     bash benchmarks/device.sh prepare
# copies the device's pycocotools wheel (../shared/wheels/device), a faster-coco-eval wheel for python3.12 (the
# evaluation's COCOeval; the device's image has neither; it has PyYAML, tqdm, h5py), Penn-Fudan and the commit
# (HEAD, and whether src/ or benchmarks/ have uncommitted changes: the device's copy of the tree has no .git) into
# .device/ (git-ignored: Penn-Fudan's licence forbids committing it; about 58 MB of the 64 MiB a call carries).
# Then, through the device tool, with carry [".device"] and timeout_s 600:
#     bash benchmarks/device.sh run all          # everything below in about 9 minutes of an H100 (estimate in
#                                                # gpu_protocol.py's header); stops starting cases at 560 s
#     bash benchmarks/device.sh run throughput   # the bf16, fp32 and batch-1 steps alone (about 2 minutes)
#     bash benchmarks/device.sh run accuracy     # Penn-Fudan, 200 s of training per model (about 7 minutes)
#     bash benchmarks/device.sh run profile      # torch.profiler of ours, batch 8 bf16 (gpu_profile.py)
# Extra arguments go to the script (e.g. `run all --detections 100`). Figures and logs go to $OUT (the device
# tool brings them back), or to .device/out without it: gpu_protocol.json (rewritten after each case, so a run
# cut off keeps what it finished), gpu_protocol.log, device.txt; gpu_profile_cuda.json and profile.log.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=.device

case "${1:-}" in
prepare)
    rm -rf "$stage/wheels" "$stage/PennFudanPed"
    mkdir -p "$stage/wheels"
    cp ../shared/wheels/device/pycocotools-*.whl "$stage/wheels/"
    python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp --no-deps \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$stage/wheels" faster-coco-eval
    cp -r ../shared/data/PennFudanPed "$stage/PennFudanPed"
    { git rev-parse HEAD; git status --porcelain --untracked-files=no -- src benchmarks | sed 's/^/changed: /'; } \
        >"$stage/commit"
    cat "$stage/commit"
    du -sh "$stage"
    ;;
run)
    what=${2:?run all, run throughput, run accuracy or run profile}
    out=${OUT:-$stage/out}
    mkdir -p "$out"
    python3 -m pip install --quiet --upgrade --no-index --no-deps --no-compile --target /tmp/site "$stage"/wheels/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src" MASKRCNN_PENNFUDAN="$PWD/$stage/PennFudanPed" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
    python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/device.txt"
    protocol() { python3 benchmarks/gpu_protocol.py --device cuda --json "$out/gpu_protocol.json" "$@" 2>&1 | tee "$out/gpu_protocol.log"; }
    case "$what" in
    all) protocol --deadline-s 560 "${@:3}" ;;
    throughput) protocol --steps bf16 fp32 batch1 "${@:3}" ;;
    accuracy) protocol --steps accuracy "${@:3}" ;;
    profile) python3 benchmarks/gpu_profile.py --device cuda --json "$out/gpu_profile_cuda.json" "${@:3}" 2>&1 | tee "$out/profile.log" ;;
    *) echo "run all | run throughput | run accuracy | run profile" >&2; exit 2 ;;
    esac
    ;;
*)
    echo "usage: bash benchmarks/device.sh prepare | run all|throughput|accuracy|profile" >&2
    exit 2
    ;;
esac
