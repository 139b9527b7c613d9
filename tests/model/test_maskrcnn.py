import dataclasses
import math

import pytest
import torch

from maskrcnn.config import BackboneConfig, BoxHeadConfig, MaskHeadConfig, ModelConfig, TransformConfig
from maskrcnn.model import MaskRCNN, build_model
from maskrcnn.model.maskrcnn import LOSS_KEYS
from maskrcnn.model.pretrained import WeightsError


def _tiny_config(**changes) -> ModelConfig:
    values = dict(num_classes=2, backbone=BackboneConfig(depth=18, fpn_channels=32),
                  transform=TransformConfig(min_size=None, max_size=None),
                  box_head=BoxHeadConfig(representation_size=64, batch_size_per_image=64),
                  mask_head=MaskHeadConfig(conv_channels=16))
    values.update(changes)
    return ModelConfig(**values)


def _target(height, width, boxes, labels):
    masks = torch.zeros(len(boxes), height, width, dtype=torch.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes):
        mask[y1:y2, x1:x2] = 1
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks}


def _synthetic_pair():
    """Two images with bright rectangles (class 1) and a dark one (class 2) on noise, sizes differ."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=generator) * 0.3, torch.rand(3, 80, 112, generator=generator) * 0.3]
    targets = [_target(96, 96, [(10, 12, 50, 60), (60, 20, 90, 44)], [1, 2]),
               _target(80, 112, [(30, 10, 100, 70)], [1])]
    for image, target in zip(images, targets):
        for box, label in zip(target["boxes"].int().tolist(), target["labels"].tolist()):
            image[:, box[1]:box[3], box[0]:box[2]] = 0.9 if label == 1 else 0.5
    return images, targets


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tiny model's ops are too small to split across threads: on a shared 2-core machine one thread ran
    the 30-step test in 4 s, two threads in 80 s (OpenMP waits on the busy core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> MaskRCNN:
    torch.manual_seed(0)
    return build_model(_tiny_config())


def test_train_mode_returns_the_five_losses(model):
    images, targets = _synthetic_pair()
    model.train()
    losses = model(images, targets)
    assert tuple(losses) == LOSS_KEYS
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    model.zero_grad()
    sum(losses.values()).backward()
    assert model.mask_head.logits.weight.grad.abs().sum() > 0
    assert model.box_head.bbox_pred.weight.grad.abs().sum() > 0
    assert model.rpn.head.cls_logits.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("num_objects", [0, 1])
def test_no_gt_and_one_gt_give_finite_connected_losses(model, num_objects):
    image = torch.rand(3, 64, 72)
    target = _target(64, 72, [(5, 5, 40, 50)][:num_objects], [1][:num_objects])
    model.train()
    losses = model([image], [target])
    for key, value in losses.items():
        assert torch.isfinite(value), key
        assert value.requires_grad, key
    model.zero_grad()
    sum(losses.values()).backward()
    if num_objects == 0:
        assert losses["loss_rpn_box"].item() == 0.0
        assert losses["loss_box_reg"].item() == 0.0
        assert losses["loss_mask"].item() == 0.0
    else:
        assert losses["loss_mask"].item() > 0.0


def test_eval_output_format_and_sizes(model):
    images, _ = _synthetic_pair()
    model.eval()
    outputs = model(images)
    assert len(outputs) == 2
    for image, output in zip(images, outputs):
        assert set(output) == {"boxes", "labels", "scores", "masks"}
        count = output["boxes"].shape[0]
        assert 0 < count <= 100
        assert output["boxes"].dtype == torch.float32 and output["labels"].dtype == torch.int64
        assert output["scores"].shape == (count,) and output["labels"].shape == (count,)
        assert output["masks"].shape == (count, 1, *image.shape[-2:])
        assert output["masks"].min() >= 0 and output["masks"].max() <= 1
        assert (output["labels"] >= 1).all() and (output["labels"] <= 2).all()
        assert (output["scores"][:-1] >= output["scores"][1:]).all()
        h, w = image.shape[-2:]
        assert (output["boxes"][:, 0::2] <= w).all() and (output["boxes"][:, 1::2] <= h).all()
        assert (output["boxes"] >= 0).all()


def _losses_gradients_detections(model, images, targets, *, bf16: bool):
    """One training forward and backward (the samplers seeded alike) and one inference, fp32 or under CPU bf16
    autocast: (losses {name: f32[]}, gradients {parameter name: f32[...]}, detections [dict])."""
    model.train()
    model.zero_grad()
    torch.manual_seed(1)  # the same anchors and proposals sampled in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        losses = model(images, targets)
    sum(losses.values()).backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return losses, gradients, model(images)


def test_bf16_autocast_trains_and_infers_in_float32_outputs(model):
    """bf16 autocast (as on GPU; CPU autocast runs the same casts): float32 losses, finite gradients, outputs of
    the same dtypes as in fp32 with masks pasted in float32, and the fp32 run's numbers within bf16's precision.

    bf16 keeps 8 significant bits: one rounding moves a value by at most 2^-8 = 0.4 % of it. Allowed: each loss
    within 1 % of fp32's (0.19 % seen: a loss averages many rounded terms), but the box regression within 10 %: it
    averages the few foreground proposals, which bf16 moves (2.4-4.5 % seen over four seeds on a CPU with AMX bf16
    units, whose kernels round otherwise than the emulation on a CPU without them); the RPN head's gradients (its
    sampled anchors are the same in both runs; the box and mask heads sample proposals, which bf16 moves) within 5 % in
    L2 norm (1.5 % seen, through a few convolutions); the detection scores, sorted (order-free: this random-init
    model's ~100 scores per image are near-ties at 0.35, whose order bf16 changes), within 0.01 (0.005 seen; the
    bf16 step of a score of 0.35 is 2^-9 = 0.002)."""
    images, targets = _synthetic_pair()
    fp32_losses, fp32_gradients, fp32_outputs = _losses_gradients_detections(model, images, targets, bf16=False)
    losses, gradients, outputs = _losses_gradients_detections(model, images, targets, bf16=True)
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in losses.values())
    assert all(torch.isfinite(gradient).all() for gradient in gradients.values())
    for name, value in losses.items():
        assert abs(value.item() / fp32_losses[name].item() - 1) <= (0.1 if name == "loss_box_reg" else 0.01), name
    rpn = [name for name in fp32_gradients if name.startswith("rpn.")]
    expected, got = (torch.cat([g[name].flatten() for name in rpn]) for g in (fp32_gradients, gradients))
    assert (got - expected).norm() <= 0.05 * expected.norm() and expected.norm() > 0
    for output, fp32_output in zip(outputs, fp32_outputs, strict=True):
        assert output["boxes"].dtype == output["scores"].dtype == output["masks"].dtype == torch.float32
        assert output["labels"].dtype == torch.int64
        assert len(output["scores"]) == len(fp32_output["scores"]) > 0
        torch.testing.assert_close(output["scores"].sort().values, fp32_output["scores"].sort().values,
                                   rtol=0, atol=0.01)


def test_return_proposals_in_original_pixels(model):
    images, _ = _synthetic_pair()
    model.eval()
    outputs = model.inference(images, return_proposals=True)
    for image, output in zip(images, outputs):
        proposals, scores = output["proposals"], output["proposal_scores"]
        assert proposals.shape[1] == 4 and proposals.shape[0] == scores.shape[0] > 0
        assert (scores[:-1] >= scores[1:]).all() and (scores >= 0).all() and (scores <= 1).all()
        h, w = image.shape[-2:]
        assert (proposals >= 0).all() and (proposals[:, 2] <= w).all() and (proposals[:, 3] <= h).all()


def test_resize_maps_outputs_back_to_the_original_size():
    torch.manual_seed(0)
    model = build_model(_tiny_config(transform=TransformConfig(min_size=128, max_size=200))).eval()
    image = torch.rand(3, 60, 90)
    output = model([image])[0]
    assert output["masks"].shape[-2:] == (60, 90)
    assert (output["boxes"][:, 2] <= 90).all() and (output["boxes"][:, 3] <= 60).all()


def test_inference_requires_eval_mode(model):
    images, _ = _synthetic_pair()
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        model.inference(images)
    with pytest.raises(RuntimeError, match="eval"):
        model.detect(images)
    assert model.training  # the mode is the caller's: never changed


def test_detect_is_padded_and_inference_is_its_pasted_valid_prefix(model):
    images, _ = _synthetic_pair()
    model.eval()
    with torch.no_grad():
        detections = model.detect(images)
        outputs = model.inference(images)
    D = model.box_head.detections_per_img
    assert detections.boxes.shape == (2, D, 4) and detections.masks.shape == (2, D, 28, 28)
    assert detections.scores.shape == detections.labels.shape == detections.valid.shape == (2, D)
    for index, output in enumerate(outputs):
        count = output["boxes"].shape[0]
        valid = detections.valid[index]
        assert valid[:count].all() and not valid[count:].any()  # a prefix
        torch.testing.assert_close(detections.boxes[index, :count], output["boxes"])
        torch.testing.assert_close(detections.scores[index, :count], output["scores"])
        assert torch.equal(detections.labels[index, :count], output["labels"])
        assert (detections.scores[index, count:] == 0).all() and (detections.labels[index, count:] == 0).all()
        # the pasted mask of a detection is its box-relative mask resampled inside the box: means agree roughly
        box = output["boxes"][0].round().int().tolist()
        inside = output["masks"][0, 0, box[1]:box[3], box[0]:box[2]]
        assert abs(inside.mean().item() - detections.masks[index, 0].mean().item()) < 0.1


def test_thirty_sgd_steps_halve_the_loss():
    torch.manual_seed(0)
    model = build_model(_tiny_config())
    model.train()
    images, targets = _synthetic_pair()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    history = []
    for _ in range(30):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-3:]) / 3 <= 0.5 * history[0], history


def test_bad_input_errors(model):
    model.train()
    image = torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match="targets are required"):
        model([image])
    target = _target(32, 32, [(1, 1, 9, 9)], [1])
    with pytest.raises(ValueError, match="target 0"):
        model([image], [{**target, "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="masks"):
        model([image], [{"boxes": target["boxes"], "labels": target["labels"]}])


def test_weights_from_checkpoint_and_state_dict(tmp_path, model):
    cfg = _tiny_config()
    checkpoint = {"model": model.state_dict(), "iteration": 3, "rng": {"torch": torch.get_rng_state()},
                  "config": {"model": {"num_classes": 2}}}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    for name in ("checkpoint.pt", "bare.pt"):
        loaded = build_model(dataclasses.replace(cfg, weights=str(tmp_path / name)))
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_model(dataclasses.replace(cfg, weights=str(tmp_path / "missing.pt")))
    # another class count loads (tests/model/test_finetune.py); another head width does not
    with pytest.raises(WeightsError, match=r"bare.pt.*box_head.fc6.weight has shape \[64, 1568\] in the weights, "
                                           r"\[65, 1568\] in the model"):
        build_model(dataclasses.replace(cfg, weights=str(tmp_path / "bare.pt"),
                                        box_head=BoxHeadConfig(representation_size=65, batch_size_per_image=64)))
    state = model.state_dict()
    name = next(key for key, value in state.items() if value.is_floating_point())
    torch.save({**state, name: torch.full_like(state[name], float("inf"))}, tmp_path / "inf.pt")
    with pytest.raises(WeightsError, match=f"inf.pt: weight {name} holds NaN or infinite"):
        build_model(dataclasses.replace(cfg, weights=str(tmp_path / "inf.pt")))
