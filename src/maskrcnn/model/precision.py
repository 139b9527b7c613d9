"""fp32 or bf16 on the CPU: `model.precision` (inference) and `train.precision` (training), each fp32, bf16 or
auto, the faster of the two as timed on the first calls.

Why: fp32 inference already runs at about the CPU's fp32 matrix-multiply rate (issue 22: 461.6 GFLOP of a
ResNet-50 Mask R-CNN at 800x1088 in 3.36 s, 140 GFLOP/s measured), while a CPU with bf16 units (AVX-512 BF16,
AMX) multiplies bf16 matrices 2.6x faster (366 GFLOP/s on the project's AMD EPYC). bf16 runs the convolutions and
linear layers (backbone, FPN, RPN head, box and mask heads) through `torch.autocast`, which keeps the weights in
fp32 and casts them per call; the CPU speed layer's RoIAlign pools the bf16 maps in bf16 (`cpu_speedups.py`); box
decoding, NMS, scores and the mask paste stay fp32 (`rpn.py`, `box_head.py`, `maskrcnn.py` and `postprocess.py`
cast back before them).

Why measured: whether bf16 wins depends on the model and the CPU: a small model at small images spends its time
in casts and non-matrix work, where bf16 buys nothing. So `auto` alternates the two precisions over its first
calls (alternating, so a machine whose load changes meanwhile slows both alike), skips SKIP_CALLS of each, times
PROBE_CALLS of each and keeps the one with the shorter median. A CPU without bf16 units gets fp32 from `auto`
without timing anything, and `bf16` there is an error: oneDNN would emulate it, slower than fp32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from maskrcnn.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
# set to 1: behave as on a CPU without bf16 units, whatever this one has (tests of the fp32 fallback)
NO_BF16_ENV = "MASKRCNN_NO_CPU_BF16"


class PrecisionError(UserError, ValueError):
    """bf16 asked for on a CPU without bf16 units, or an unknown precision; the message names the setting."""


def cpu_has_bf16() -> bool:
    """True when this CPU has bf16 units (AVX-512 BF16 or AMX-BF16) that oneDNN uses, unless NO_BF16_ENV is 1."""
    if os.environ.get(NO_BF16_ENV, "") == "1":
        return False
    capabilities = torch.cpu.get_capabilities()
    units = capabilities.get("avx512_bf16", False) or capabilities.get("amx_bf16", False)
    return bool(units and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PrecisionChoice:
    """fp32 or bf16 for the calls of one model: fixed, or chosen by timing both (`auto`).

    Use `autocast(tensor)` around a call (the model's inference), or `bf16()` before a call and `record(seconds)`
    after it (the trainer's step, which times itself).

    Args:
        setting: "fp32", "bf16" or "auto".
        key: the setting's name in error and log lines, e.g. "model.precision".
        bf16_supported: whether the CPU has bf16 units; None: `cpu_has_bf16()`.
        skip_calls, probe_calls: `auto`: untimed, then timed calls of each precision (default SKIP_CALLS,
            PROBE_CALLS).
        timer: seconds as a float (`time.perf_counter`); tests put a fake one here.
    Raises:
        PrecisionError: an unknown setting, or bf16 without bf16 units.
    """

    SKIP_CALLS = 1  # untimed calls of each precision first: oneDNN builds its primitives for each on first use
    PROBE_CALLS = 3  # timed calls of each precision: the median of 3 ignores one outlier

    def __init__(self, setting: str = "fp32", *, key: str = "model.precision", bf16_supported: bool | None = None,
                 skip_calls: int = SKIP_CALLS, probe_calls: int = PROBE_CALLS,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        if setting not in PRECISIONS:
            raise PrecisionError(f"{key}: must be one of {PRECISIONS}, got {setting!r}")
        supported = cpu_has_bf16() if bf16_supported is None else bf16_supported
        if setting == "bf16" and not supported:
            raise PrecisionError(f"{key}: bf16 needs a CPU with bf16 units (AVX-512 BF16 or AMX), and this "
                                 f"{torch.cpu.get_capabilities().get('cpu_name') or 'CPU'} has none; use fp32 or auto")
        self.setting, self.key, self.timer = setting, key, timer
        self.skip_calls, self.probe_calls = skip_calls, probe_calls
        # the precision every call runs in; None while `auto` is still timing
        self.chosen: str | None = setting if setting != "auto" else (None if supported else "fp32")
        self.calls = 0  # calls recorded while timing
        self.times: dict[str, list[float]] = {"fp32": [], "bf16": []}

    def __repr__(self) -> str:
        return f"PrecisionChoice({self.setting!r}, chosen={self.chosen!r})"

    def bf16(self) -> bool:
        """Whether the next call runs in bf16 (while timing: every other call, fp32 first)."""
        return (self.chosen or self._turn()) == "bf16"

    def _turn(self) -> str:
        return ("fp32", "bf16")[self.calls % 2]

    def record(self, seconds: float) -> None:
        """The duration of the call just made (per unit of work where calls differ in size); once both
        precisions have PROBE_CALLS timed calls, the faster median is chosen for every later call."""
        if self.chosen is not None:
            return
        if self.calls >= 2 * self.skip_calls:
            self.times[self._turn()].append(seconds)
        self.calls += 1
        if self.calls == 2 * (self.skip_calls + self.probe_calls):
            medians = {name: statistics.median(times) for name, times in self.times.items()}
            self.chosen = min(medians, key=medians.get)
            ratio = medians["bf16"] / medians["fp32"]
            log.info(f"{self.key} auto: median call in bf16 {ratio:.2f}x the time of fp32: running {self.chosen}")

    @contextlib.contextmanager
    def autocast(self, tensor: Tensor) -> Iterator[None]:
        """bf16 autocast around the block when this call runs in bf16 and `tensor` is on the CPU; while timing,
        the block's seconds per element of `tensor` (the batch: calls differ in image sizes) are recorded.

        Args:
            tensor: the batch the block works on, f32[B, 3, H, W].
        """
        # fp32 and other devices (where the caller's autocast, train.amp on CUDA, applies): nothing added, so
        # that torch.export and ONNX export trace the plain model
        if tensor.device.type != "cpu" or self.chosen == "fp32":
            yield
        elif self.chosen == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                yield
        else:
            bf16 = self.bf16()
            start = self.timer()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                yield
            self.record((self.timer() - start) / tensor.numel())
