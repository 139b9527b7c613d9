import itertools

import pytest
import torch
from torch.utils.data import Dataset

from maskrcnn.data.loader import TrainBatchSampler, build_eval_loader, build_train_loader, collate, orientation_groups


class Sized(Dataset):
    """Images of given sizes; image i is filled with the value i, so batches can be traced back."""

    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def image_size(self, index):
        return self.sizes[index]

    def __getitem__(self, index):
        h, w = self.sizes[index]
        return torch.full((3, h, w), index, dtype=torch.uint8), {"image_id": index}


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_collate_keeps_lists():
    images, targets = collate([(torch.zeros(3, 2, 4), {"image_id": 0}), (torch.zeros(3, 5, 1), {"image_id": 1})])
    assert [tuple(i.shape) for i in images] == [(3, 2, 4), (3, 5, 1)]
    assert [t["image_id"] for t in targets] == [0, 1]


def test_epochs_are_permutations_deterministic_by_seed():
    sampler = TrainBatchSampler(num_images=6, batch_size=3, seed=5)
    batches = take(sampler, 6)  # three epochs
    epochs = [sorted(batches[0] + batches[1]), sorted(batches[2] + batches[3]), sorted(batches[4] + batches[5])]
    assert epochs == [list(range(6))] * 3
    assert batches[:2] != batches[2:4]  # reshuffled
    assert take(TrainBatchSampler(num_images=6, batch_size=3, seed=5), 6) == batches
    assert take(TrainBatchSampler(num_images=6, batch_size=3, seed=6), 6) != batches
    assert take(TrainBatchSampler(num_images=6, batch_size=3, seed=5, start_iter=4), 2) == batches[4:]


@pytest.mark.parametrize("num_images", [8, 7, 1])
def test_distributed_shards_are_disjoint_and_cover_every_image(num_images):
    world = 2
    per_rank = -(-num_images // world)
    shards = [sum(take(TrainBatchSampler(num_images=num_images, batch_size=1, seed=0, rank=r, world_size=world),
                       per_rank), []) for r in range(world)]
    assert all(len(s) == per_rank for s in shards)
    assert set(shards[0]) | set(shards[1]) == set(range(num_images))
    # an odd count is padded by repeating images: exactly per_rank * world - num_images repeats
    assert len(shards[0] + shards[1]) - len(set(shards[0] + shards[1])) == per_rank * world - num_images


def test_aspect_ratio_grouping_batches_one_orientation():
    sizes = [(10, 20), (20, 10), (10, 10), (30, 5), (5, 30), (40, 8), (8, 9)]  # portrait: 1, 3, 5
    groups = orientation_groups(Sized(sizes))
    assert groups == [0, 1, 0, 1, 0, 1, 0]
    sampler = TrainBatchSampler(num_images=7, batch_size=2, seed=1, group_ids=groups)
    for batch in take(sampler, 20):
        assert len(batch) == 2 and groups[batch[0]] == groups[batch[1]]


def test_train_loader_yields_grouped_batches_and_resumes():
    sizes = [(4, 6), (6, 4), (4, 6), (6, 4), (5, 7), (7, 5)]
    loader = build_train_loader(Sized(sizes), batch_size=2, seed=3)
    batches = [next(loader) for _ in range(5)]
    for images, targets in batches:
        assert len(images) == 2 and len({tuple(i.shape) for i in images}) == 1 or \
            len({i.shape[1] > i.shape[2] for i in images}) == 1
        assert [int(i[0, 0, 0]) for i in images] == [t["image_id"] for t in targets]
    resumed = build_train_loader(Sized(sizes), batch_size=2, seed=3, start_iter=3)
    assert [t["image_id"] for t in next(resumed)[1]] == [t["image_id"] for t in batches[3][1]]


class RandomDraw(Sized):
    """Each sample carries one draw of torch's generator, as a random augmentation makes."""

    def __getitem__(self, index):
        image, target = super().__getitem__(index)
        return image, {**target, "draw": float(torch.rand(()))}


def draws(loader, n):
    return [[(t["image_id"], t["draw"]) for t in next(loader)[1]] for _ in range(n)]


def test_augmentations_do_not_depend_on_workers_or_resume():
    dataset = RandomDraw([(4, 6)] * 5)
    in_process = draws(build_train_loader(dataset, batch_size=2, seed=3), 6)
    assert draws(build_train_loader(dataset, batch_size=2, seed=3, num_workers=2), 6) == in_process
    assert draws(build_train_loader(dataset, batch_size=2, seed=3, num_workers=2, start_iter=4), 2) == in_process[4:]
    values = [draw for batch in in_process for _, draw in batch]
    assert len(set(values)) == len(values)  # a fresh draw for every sample, also for an image seen again
    assert draws(build_train_loader(dataset, batch_size=2, seed=4), 6) != in_process
    state = torch.get_rng_state()
    draws(build_train_loader(dataset, batch_size=2, seed=3), 1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left as it was


def test_eval_loader_in_order_with_a_short_last_batch():
    loader = build_eval_loader(Sized([(2, 2)] * 5), batch_size=2)
    assert [[t["image_id"] for t in targets] for _, targets in loader] == [[0, 1], [2, 3], [4]]


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="empty data set"):
        TrainBatchSampler(num_images=0, batch_size=1)
    with pytest.raises(ValueError, match="rank"):
        TrainBatchSampler(num_images=3, batch_size=1, rank=2, world_size=2)
