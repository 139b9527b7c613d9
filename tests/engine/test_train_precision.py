"""train.precision: CPU training steps under bf16 autocast (fp32 weights), or auto: the faster, timed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from maskrcnn.engine import train as train_module
from maskrcnn.engine.train import train
from maskrcnn.model import build_model
from maskrcnn.model import precision as precision_module
from maskrcnn.model.precision import NO_BF16_ENV, PrecisionError


def _model_recording_dtypes(cfg) -> tuple[torch.nn.Module, list[torch.dtype]]:
    """The config's model, and a list that gets the dtype of the backbone's p2 map at every training step."""
    model = build_model(cfg.model)
    dtypes = []
    model.backbone.register_forward_hook(lambda m, i, out: dtypes.append(out["p2"].dtype) if m.training else None)
    return model, dtypes


def test_bf16_training_runs_the_model_in_bf16_with_fp32_weights_and_finite_losses(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: True)  # any CPU: oneDNN emulates bf16 units
    cfg = tiny_config(tmp_path / "run", "train.precision=bf16", "train.max_iters=2")
    model, dtypes = _model_recording_dtypes(cfg)
    result = train(cfg, model=model, progress=False)
    assert dtypes == [torch.bfloat16] * 2
    assert all(param.dtype == torch.float32 for param in result.model.parameters())  # autocast casts per call
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if "loss" in record]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_auto_training_times_both_precisions_then_keeps_one(tmp_path, tiny_config, monkeypatch, caplog):
    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(train_module, "PRECISION_PROBE_STEPS", (1, 2))  # 1 untimed, 2 timed steps of each
    cfg = tiny_config(tmp_path / "run", "train.precision=auto", "train.max_iters=8", "train.log_period=8")
    model, dtypes = _model_recording_dtypes(cfg)
    with caplog.at_level("INFO", logger="maskrcnn"):
        train(cfg, model=model, progress=False)
    probe = 2 * (1 + 2)
    assert dtypes[:probe] == [torch.float32, torch.bfloat16] * (probe // 2)
    chosen = [line for line in caplog.messages if line.startswith("train.precision auto: median call in bf16")]
    assert len(chosen) == 1
    assert dtypes[probe:] == [{"fp32": torch.float32, "bf16": torch.bfloat16}[chosen[0].split()[-1]]] * 2


def test_without_bf16_units_auto_trains_in_fp32_and_bf16_is_refused(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv(NO_BF16_ENV, "1")
    cfg = tiny_config(tmp_path / "auto", "train.precision=auto", "train.max_iters=2")
    model, dtypes = _model_recording_dtypes(cfg)
    train(cfg, model=model, progress=False)
    assert dtypes == [torch.float32] * 2
    with pytest.raises(PrecisionError, match=r"^train\.precision: bf16 needs a CPU with bf16 units"):
        train(tiny_config(tmp_path / "bf16", "train.precision=bf16"), progress=False)
    assert not (tmp_path / "bf16" / "config.yaml").exists()  # refused before the run folder is written
