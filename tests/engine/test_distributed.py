"""Distributed helpers in one process (no process group): rank 0 of 1, reduce is the identity."""

from __future__ import annotations

import torch

from maskrcnn.engine import distributed


def test_single_process_defaults(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed() is None
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    assert distributed.is_main() and not distributed.is_distributed()
    distributed.barrier()


def test_world_size_one_does_not_start_a_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_distributed() is None and not distributed.is_distributed()


def test_reduce_loss_dict_single_process():
    losses = {"loss_b": torch.tensor(2.0, requires_grad=True), "loss_a": torch.tensor(0.5)}
    reduced = distributed.reduce_loss_dict(losses)
    assert list(reduced) == ["loss_a", "loss_b"]
    assert reduced["loss_b"].item() == 2.0 and not reduced["loss_b"].requires_grad
    assert distributed.reduce_loss_dict({}) == {}
