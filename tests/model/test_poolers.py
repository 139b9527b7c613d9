import torch
from torchvision.ops import MultiScaleRoIAlign

from maskrcnn.model.poolers import LevelRoIAlign, image_index_rois


def _features(batch=2, channels=4, canvas=(128, 128)):
    return {f"p{k}": torch.randn(batch, channels, canvas[0] // 2**k, canvas[1] // 2**k) for k in (2, 3, 4, 5)}


def test_level_assignment_by_hand():
    pooler = LevelRoIAlign(output_size=7, sampling_ratio=2, aligned=True)
    sides = torch.tensor([10.0, 111.0, 112.0, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros(7), torch.zeros(7), sides, sides], dim=1)
    # k = floor(4 + log2(side / 224)) clamped to 2..5, returned as an index into p2..p5
    assert pooler.assign_levels(boxes).tolist() == [0, 0, 1, 2, 2, 3, 3]


def test_doubling_the_canonical_size_pools_every_roi_one_level_finer():
    pooler = LevelRoIAlign(output_size=7, sampling_ratio=2, aligned=True, canonical_size=448)
    sides = torch.tensor([10.0, 223.0, 224.0, 447.0, 448.0, 895.0, 896.0, 4000.0])
    boxes = torch.stack([torch.zeros(8), torch.zeros(8), sides, sides], dim=1)
    # k = floor(4 + log2(side / 448)): 224 px RoIs now come from p3, 448 px ones from p4
    assert pooler.assign_levels(boxes).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_pooler_matches_torchvision_multiscale_roi_align_forward_and_backward():
    torch.manual_seed(0)
    features = {name: feature.requires_grad_() for name, feature in _features(canvas=(256, 320)).items()}
    xy = torch.rand(40, 2) * 200
    boxes = torch.cat([xy, xy + torch.rand(40, 2) * 300 + 2], dim=1)
    image = torch.randint(0, 2, (40,))
    ours = LevelRoIAlign(output_size=7, sampling_ratio=2, aligned=False)
    theirs = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)
    expected = theirs(features, [boxes[image == 0], boxes[image == 1]], [(256, 320)] * 2)
    order = torch.cat([torch.nonzero(image == 0)[:, 0], torch.nonzero(image == 1)[:, 0]])
    got = ours(features, torch.cat([image[:, None].float(), boxes], dim=1))
    torch.testing.assert_close(got[order], expected)

    upstream = torch.randn(expected.shape)  # one weight per pooled value, so every RoI's gradient is distinct
    expected_grads = torch.autograd.grad((expected * upstream).sum(), list(features.values()), materialize_grads=True)
    got_grads = torch.autograd.grad((got[order] * upstream).sum(), list(features.values()), materialize_grads=True)
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_grad, expected_grad)


def test_injected_roi_align_gets_each_level_and_the_order_is_restored():
    def level_scale(feature, rois, output_size, *, spatial_scale, sampling_ratio, aligned):
        # every pooled value is the spatial scale of the level the RoI was sent to
        return feature.new_full((rois.shape[0], feature.shape[1], output_size, output_size), spatial_scale)

    pooler = LevelRoIAlign(output_size=2, sampling_ratio=2, aligned=True, roi_align=level_scale)
    sides = torch.tensor([500.0, 10.0, 230.0, 120.0])  # levels p5, p2, p4, p3 by k = floor(4 + log2(side / 224))
    boxes = torch.stack([torch.zeros(4), torch.zeros(4), sides, sides], dim=1)
    pooled = pooler(_features(), image_index_rois(torch.tensor([0, 1, 0, 1]), boxes))
    assert pooled.shape == (4, 4, 2, 2)
    assert pooled[:, 0, 0, 0].tolist() == [2.0**-5, 2.0**-2, 2.0**-4, 2.0**-3]


def test_image_index_rois():
    rois = image_index_rois(torch.tensor([1, 0]), torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]))
    assert rois.tolist() == [[1.0, 1, 2, 3, 4], [0.0, 5, 6, 7, 8]]
