"""Training data that a checkpoint can stop and resume in the middle of an epoch.

Two pieces make a resumed epoch hand out exactly the batches the uninterrupted one would:

- every random draw of the training data is a function of ``(seed, epoch, index)``: the
  :class:`EpochSampler` pairs each index with its epoch (a :class:`Draw`), and the datasets
  seed their noise, augmentation or toy points from that key, whichever process (main or a
  loader worker) draws it;
- the :class:`ResumableLoader` counts the batches it has handed out; Lightning saves that
  count with the loops' state (``state_dict``) and restores it (``load_state_dict``), and the
  sampler then skips the items already used.

The sampler is a ``DistributedSampler``: under DDP Lightning keeps it (it injects its own
sampler only into loaders without one), every rank gets its own share of each epoch, and
Lightning's ``set_epoch`` calls reach it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["Draw", "draw_seed", "EpochSampler", "ResumableLoader"]


class Draw(NamedTuple):
    """The key of one training item: which epoch draws it, and its index in the dataset."""

    epoch: int
    index: int


def draw_seed(seed: int, epoch: int, index: int) -> int:
    """A generator seed for item ``index`` of epoch ``epoch`` (distinct for distinct keys in practice)."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 1_000_000_007 + int(index)) % (2**63)


class EpochSampler(DistributedSampler):
    """This rank's share of the dataset for one epoch, as :class:`Draw` keys.

    ``shuffle``: a permutation seeded by ``seed + epoch`` (torch's ``DistributedSampler``);
    otherwise the indices in order, dealt out to the ranks (rank ``r`` of ``W`` gets
    ``r, r + W, ...``). :meth:`skip_to` makes the next pass of one epoch start after the
    first ``items`` of this rank's share.
    """

    def __init__(self, dataset: Dataset, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(dataset, num_replicas=max(1, int(world_size)), rank=int(rank), shuffle=shuffle,
                         seed=int(seed), drop_last=False)
        self._skip: tuple[int, int] | None = None  # (epoch, items) to leave out of that epoch's next pass

    def skip_to(self, epoch: int, items: int) -> None:
        self.set_epoch(epoch)
        self._skip = (int(epoch), int(items))

    def __iter__(self):
        skip = 0
        if self._skip is not None:
            if self._skip[0] == self.epoch:
                skip = self._skip[1]
            self._skip = None
        indices = list(super().__iter__())
        for index in indices[skip:]:
            yield Draw(self.epoch, int(index))


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` whose position in the epoch is part of a checkpoint.

    Its state is ``{"epoch", "batches", "world_size"}``: the batches handed out so far in the
    epoch (counted as they leave the loader, so batches that workers prepared ahead are not
    counted). Restored, the next pass of that epoch hands out the rest of it; a state saved at
    the end of an epoch starts the next one. Restored under another number of processes, the
    position is rescaled (the global number of batches is kept; the split is then not exact).
    """

    def __init__(self, dataset: Dataset, *, sampler: EpochSampler, batch_size: int | None = 1, **kwargs: Any):
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, **kwargs)
        self._served = 0

    @property
    def _items_per_batch(self) -> int:
        return self.batch_size or 1  # batch_size=None: every item is a whole batch

    def __iter__(self):
        # a resumed pass starts where the restored state says; a fresh pass at zero
        skip = self.sampler._skip
        self._served = skip[1] // self._items_per_batch if skip and skip[0] == self.sampler.epoch else 0
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self._served),
                "world_size": int(self.sampler.num_replicas)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        world = max(1, int(state.get("world_size", 1)))
        batches = math.ceil(int(state["batches"]) * world / self.sampler.num_replicas)
        epoch = int(state["epoch"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.sampler.skip_to(epoch, batches * self._items_per_batch)
        self._served = batches
