"""Distributed helpers in one process (no process group), and a two-process torchrun training on CPU."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import torch
import yaml

from maskrcnn.config import config_from_dict
from maskrcnn.engine import distributed
from maskrcnn.engine.common import seed_iteration
from maskrcnn.model import build_model


def test_single_process_defaults(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed() is None
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    assert distributed.is_main() and not distributed.is_distributed()
    distributed.barrier()


def test_world_size_one_does_not_start_a_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_distributed() is None and not distributed.is_distributed()


def test_shards_and_their_gathering_in_one_process(monkeypatch):
    assert list(distributed.shard(5)) == [0, 1, 2, 3, 4]
    assert distributed.gather_shards(["a", "b"]) == ["a", "b"]
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    assert list(distributed.shard(5)) == [1, 3]


def test_reduce_loss_dict_single_process():
    losses = {"loss_b": torch.tensor(2.0, requires_grad=True), "loss_a": torch.tensor(0.5)}
    reduced = distributed.reduce_loss_dict(losses)
    assert list(reduced) == ["loss_a", "loss_b"]
    assert reduced["loss_b"].item() == 2.0 and not reduced["loss_b"].requires_grad
    assert distributed.reduce_loss_dict({}) == {}


WORKER = """
import sys

import torch
import yaml

from maskrcnn.config import config_from_dict
from maskrcnn.engine import distributed
from maskrcnn.engine.train import train

cfg = config_from_dict(yaml.safe_load(open(sys.argv[1])), [])
result = train(cfg, progress=False)
torch.save(result.model.state_dict(), f"{sys.argv[2]}/rank{distributed.get_rank()}.pt")
"""


def test_two_ranks_under_torchrun_train_the_same_weights_and_evaluate_as_one_process(tmp_path, tiny_values):
    """torchrun, 2 CPU processes (gloo), one launch for two behaviours:
    - training: the ranks see different images, so only DDP's gradient averaging keeps their weights equal; only
      rank 0 writes the run directory;
    - the final evaluation: each rank runs inference on every second image of 5 (3 and 2 images), rank 0 gathers
      them back into data-set order and scores: the same detections and metrics as one process."""
    from maskrcnn.data import build_dataset
    from maskrcnn.engine.evaluate import evaluate_dataset

    values = copy.deepcopy(tiny_values)  # the fixture is shared: change a copy
    values["train"].update(out_dir=str(tmp_path / "run"), num_threads=1)
    values["data"]["synthetic_val_size"] = 5
    values["model"]["box_head"]["score_thresh"] = 0.0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(values))
    (tmp_path / "worker.py").write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tmp_path / "worker.py"), str(tmp_path / "config.yaml"), str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]

    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    cfg = config_from_dict(values, [])
    seed_iteration(cfg.train.seed, 0)  # as train() does before it builds the model
    model = build_model(cfg.model)
    assert not all(torch.equal(model.state_dict()[key], rank0[key]) for key in rank0)  # the ranks did train
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(saved[key], rank0[key]) for key in rank0)
    iterations = [json.loads(line)["iteration"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
    assert iterations == [1, 2, 3, 4]  # one line per iteration: rank 1 wrote nothing

    model.load_state_dict(rank0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the same float arithmetic
    try:
        single = evaluate_dataset(model.eval(), build_dataset(cfg.data, "val"), batch_size=cfg.eval.batch_size,
                                  device=torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    sharded = json.loads((tmp_path / "run" / "detections.json").read_text())
    assert [d["image_id"] for d in sharded] == [d["image_id"] for d in single.detections]
    assert sharded == json.loads(json.dumps(single.detections))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == json.loads(json.dumps(single.metrics))
    assert single.metrics["num_images"] == 5 and single.metrics["num_detections"] > 0
