"""Batching: collate, an endless shuffled training stream (distributed sharding, aspect-ratio grouping, resume)
and an in-order evaluation loader.

Images stay a list of uint8[3, H, W] of uneven sizes; the model pads them into one canvas.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


def collate(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """[(image, target), ...] -> ([image, ...], [target, ...]), without padding or stacking."""
    return [image for image, _ in batch], [target for _, target in batch]


def orientation_groups(dataset: Dataset) -> list[int]:
    """Per image: 1 for portrait (h > w), 0 for landscape or square, from `dataset.image_size` (no decoding)."""
    return [int(h > w) for h, w in (dataset.image_size(i) for i in range(len(dataset)))]


class TrainBatchSampler:
    """Endless stream of index batches for one rank of a (possibly) distributed run.

    Every epoch is a fresh permutation from one generator seeded with `seed`, identical on all ranks; rank r takes
    entries r, r + world_size, ... of it (the permutation is first extended by wrapping around to a multiple of
    world_size, so every rank sees the same number of images per epoch and the ranks' shares are disjoint within
    the original length). With `group_ids`, images wait in one bucket per group until the bucket holds a full
    batch (detectron2's aspect-ratio grouping; buckets carry over between epochs, so no image is dropped).

    Args:
        num_images: data set length (at least 1).
        batch_size: images per batch on this rank.
        seed: seed of the permutations.
        rank / world_size: this process's index and the number of processes.
        group_ids: optional group per image (e.g. `orientation_groups`); None: no grouping.
        start_iter: batches to skip at the start, to resume a run where it stopped.
    """

    def __init__(self, *, num_images: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 group_ids: list[int] | None = None, start_iter: int = 0):
        if num_images < 1:
            raise ValueError("cannot train on an empty data set")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_iter < 0:
            raise ValueError(f"need batch_size >= 1, 0 <= rank < world_size, start_iter >= 0; got batch_size="
                             f"{batch_size}, rank={rank}, world_size={world_size}, start_iter={start_iter}")
        if group_ids is not None and len(group_ids) != num_images:
            raise ValueError(f"{len(group_ids)} group ids for {num_images} images")
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.group_ids = group_ids
        self.start_iter = start_iter

    def _indices(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        per_rank = -(-self.num_images // self.world_size)  # ceil
        while True:
            order = torch.randperm(self.num_images, generator=generator)
            order = order.repeat(-(-per_rank * self.world_size // self.num_images))[:per_rank * self.world_size]
            yield from order[self.rank::self.world_size].tolist()

    def _batches(self) -> Iterator[list[int]]:
        indices = self._indices()
        if self.group_ids is None:
            while True:
                yield list(itertools.islice(indices, self.batch_size))
        buckets: dict[int, list[int]] = {}
        for index in indices:
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(self._batches(), self.start_iter, None)


class _SeededBatches:
    """A batch sampler's batches with a seed beside every index: (index, seed) from (seed, rank, batch number,
    position in the batch), so that a sample's random augmentations depend on its place in the stream only, not on
    the number of workers or on where the run was resumed."""

    def __init__(self, sampler: TrainBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        base = (self.sampler.seed, self.sampler.rank)
        for number, batch in enumerate(self.sampler, start=self.sampler.start_iter):
            seeds = np.random.SeedSequence([*base, number]).generate_state(len(batch), dtype=np.uint64)
            yield [(index, int(sample_seed)) for index, sample_seed in zip(batch, seeds)]


class _SeededSamples(Dataset):
    """Loads (index, seed) keys: the data set's sample `index`, its augmentations drawn from torch's generator
    seeded with `seed` (the caller's generator state is restored afterwards)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, sample_seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.dataset[index]


def _shut_down_on_error(loader: DataLoader) -> Iterator[tuple[list[Tensor], list[dict]]]:
    """Iterates `loader`; when it raises (e.g. a bad image read in a worker), its workers are shut down at once.

    A DataLoader re-raises a worker's error from inside its iterator, whose frames then hold the iterator in a
    reference cycle with the error. Left to the garbage collector, the workers' shutdown waited out a 5 s timeout
    (measured); dropping the error's traceback and this frame's references frees the iterator at once. The
    worker's own traceback is kept: it is the text of the re-raised error.
    """
    iterator = iter(loader)
    try:
        yield from iterator
    except Exception as error:
        del iterator, loader  # the loader holds its iterator too when its workers are persistent
        raise error.with_traceback(None) from None


def build_train_loader(dataset: Dataset, *, batch_size: int, num_workers: int = 0, aspect_ratio_grouping: bool = True,
                       seed: int = 0, rank: int = 0, world_size: int = 1,
                       start_iter: int = 0) -> Iterator[tuple[list[Tensor], list[dict]]]:
    """An endless iterator of (images, targets) training batches, reshuffled every epoch.

    Deterministic by `seed`: the index stream (see `TrainBatchSampler`) and the random augmentations of every
    sample, which draw from torch's generator seeded per sample from (seed, rank, batch number, position). The
    same run therefore sees the same batches with any `num_workers`, and a resumed run the same as an
    uninterrupted one.

    Args:
        dataset: any data set of this package (needs `image_size` when grouping).
        batch_size: images per batch on this rank.
        num_workers: DataLoader worker processes.
        aspect_ratio_grouping: batch portrait and landscape images separately.
        seed, rank, world_size: see `TrainBatchSampler`.
        start_iter: batches already consumed (resume).
    Returns:
        iterator of (list of uint8[3, H, W], list of target dicts).
    """
    sampler = TrainBatchSampler(num_images=len(dataset), batch_size=batch_size, seed=seed, rank=rank,
                                world_size=world_size, start_iter=start_iter,
                                group_ids=orientation_groups(dataset) if aspect_ratio_grouping else None)
    # a generator of its own: the DataLoader draws its workers' base seed from it instead of the caller's generator
    loader = DataLoader(_SeededSamples(dataset), batch_sampler=_SeededBatches(sampler), collate_fn=collate,
                        num_workers=num_workers, persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    return _shut_down_on_error(loader)


def build_eval_loader(dataset: Dataset, *, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches of (images, targets) in data set order, the last one possibly smaller."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
