"""model.precision / train.precision: fp32, bf16 or auto (timed) on the CPU; bf16 refused without bf16 units."""

from __future__ import annotations

import itertools

import pytest
import torch

from maskrcnn.config import BackboneConfig, BoxHeadConfig, ConfigError, MaskHeadConfig, ModelConfig, TransformConfig
from maskrcnn.config import config_from_dict
from maskrcnn.model import build_model
from maskrcnn.model import precision as precision_module
from maskrcnn.model.precision import NO_BF16_ENV, PrecisionChoice, PrecisionError, cpu_has_bf16


def test_the_environment_variable_hides_the_bf16_units(monkeypatch):
    monkeypatch.setenv(NO_BF16_ENV, "1")
    assert not cpu_has_bf16()


def test_bf16_without_bf16_units_is_one_clear_error(monkeypatch):
    with pytest.raises(PrecisionError, match=r"^train\.precision: bf16 needs a CPU with bf16 units .*use fp32 or auto$"):
        PrecisionChoice("bf16", key="train.precision", bf16_supported=False)
    monkeypatch.setenv(NO_BF16_ENV, "1")
    with pytest.raises(PrecisionError, match=r"^model\.precision: bf16 needs"):
        build_model(_tiny_config(precision="bf16"))
    with pytest.raises(PrecisionError, match="model.precision: must be one of"):
        PrecisionChoice("fp16")


def test_auto_without_bf16_units_is_fp32_and_times_nothing(monkeypatch):
    monkeypatch.setenv(NO_BF16_ENV, "1")
    model = build_model(_tiny_config(precision="auto")).eval()
    assert model.precision.chosen == "fp32"
    with model.precision.autocast(torch.zeros(1, 3, 8, 8)):
        assert not torch.is_autocast_enabled("cpu")
    model(_images())
    assert model.precision.calls == 0 and model.precision.chosen == "fp32"


def _drive(choice: PrecisionChoice, seconds: dict[bool, float], calls: int, clock: list[float]) -> list[bool]:
    """Makes `calls` calls through `choice.autocast`, each taking seconds[bf16] on the fake clock; returns whether
    each ran under bf16 autocast."""
    ran = []
    for _ in range(calls):
        with choice.autocast(torch.zeros(2, 5)):  # 10 elements: the recorded time is per element
            bf16 = torch.is_autocast_enabled("cpu")
            clock[0] += seconds[bf16]
        ran.append(bf16)
    return ran


@pytest.mark.parametrize("fp32_s, bf16_s, chosen", [(2.0, 1.0, "bf16"), (1.0, 3.0, "fp32")])
def test_auto_alternates_skips_the_first_call_of_each_then_keeps_the_faster(fp32_s, bf16_s, chosen):
    clock = [0.0]
    choice = PrecisionChoice("auto", bf16_supported=True, skip_calls=1, probe_calls=3, timer=lambda: clock[0])
    ran = _drive(choice, {False: fp32_s, True: bf16_s}, 8 + 3, clock)
    assert ran[:8] == [False, True] * 4  # fp32 first, alternating
    assert ran[8:] == [chosen == "bf16"] * 3 and choice.chosen == chosen
    # the two skipped calls are not timed; the others are seconds per element of the batch
    assert choice.times == {"fp32": [fp32_s / 10] * 3, "bf16": [bf16_s / 10] * 3}


def test_auto_takes_the_median_so_one_slow_call_does_not_decide():
    choice = PrecisionChoice("auto", bf16_supported=True, skip_calls=0, probe_calls=3)
    for seconds in (1.0, 9.0, 1.0, 0.5, 1.0, 0.5):  # fp32, bf16 alternating; bf16's first call a hiccup
        choice.bf16()
        choice.record(seconds)
    assert choice.chosen == "bf16"


def test_fixed_precisions_run_as_set_without_timing():
    tick = itertools.count()
    bf16 = PrecisionChoice("bf16", bf16_supported=True, timer=lambda: float(next(tick)))
    fp32 = PrecisionChoice("fp32", bf16_supported=True, timer=lambda: float(next(tick)))
    assert _drive(bf16, {True: 0.0, False: 0.0}, 3, [0.0]) == [True] * 3
    assert _drive(fp32, {True: 0.0, False: 0.0}, 3, [0.0]) == [False] * 3
    assert next(tick) == 0  # the timer was never read


def test_bf16_inference_runs_backbone_and_heads_in_bf16_and_returns_float32():
    """bf16 forced on (oneDNN emulates it on CPUs without bf16 units, slowly but correctly): the backbone's maps
    and the heads' logits are bf16, the boxes, scores and masks float32. (How close bf16's detections are to
    fp32's is measured on a trained model, benchmarks/cpu_limit.py: a random one ranks near-equal scores.)"""
    torch.manual_seed(0)
    model = build_model(_tiny_config()).eval()
    dtypes = {}
    for name in ("backbone", "box_head", "mask_head"):
        module = getattr(model, name)
        module.register_forward_hook(lambda m, i, out, name=name: dtypes.__setitem__(
            name, (out["p2"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out).dtype))
    images = _images()
    fp32 = model(images)
    assert dtypes == dict.fromkeys(dtypes, torch.float32)
    model.precision = PrecisionChoice("bf16", bf16_supported=True)
    bf16 = model(images)
    assert dtypes == dict.fromkeys(("backbone", "box_head", "mask_head"), torch.bfloat16)
    assert not torch.is_autocast_enabled("cpu")  # only inside the model
    for ours, reference in zip(bf16, fp32):
        assert all(ours[key].dtype == torch.float32 for key in ("boxes", "scores", "masks"))
        assert ours["boxes"].shape[0] == reference["boxes"].shape[0] > 0  # score_thresh 0: every slot filled


def test_model_precision_is_a_checked_config_choice():
    assert ModelConfig().precision == "fp32"
    with pytest.raises(ConfigError, match="model.precision: must be one of"):
        config_from_dict({"model": {"precision": "half"}})
    with pytest.raises(ConfigError, match="train.precision: must be one of"):
        config_from_dict({"train": {"precision": "int8"}})


def test_build_model_forwards_the_precision(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: True)
    assert build_model(_tiny_config(precision="bf16")).precision.chosen == "bf16"
    assert build_model(_tiny_config(precision="auto")).precision.chosen is None  # timed on the first calls


def _tiny_config(**changes) -> ModelConfig:
    values = dict(num_classes=2, backbone=BackboneConfig(depth=18, fpn_channels=32),
                  transform=TransformConfig(min_size=None, max_size=None),
                  box_head=BoxHeadConfig(representation_size=64, batch_size_per_image=64, score_thresh=0.0),
                  mask_head=MaskHeadConfig(conv_channels=16))
    values.update(changes)
    return ModelConfig(**values)


def _images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=generator) * 0.3, torch.rand(3, 80, 112, generator=generator) * 0.3]
    images[0][:, 10:60, 12:50] = 0.9
    images[1][:, 30:70, 10:100] = 0.6
    return images
