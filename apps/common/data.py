"""Training data that a resumed run continues where the interrupted one stopped, mid-epoch included.

Lightning (2.x) restores the model, optimiser, schedulers and loop counters from a checkpoint, but a plain
DataLoader starts its epoch again from the first batch: after a crash mid-epoch the resumed run would train on
the epoch's first batches twice and never on the rest, and its loss curve would not continue the original's.
``ResumableLoader`` fixes that for map-style datasets whose item ``i`` depends only on ``i`` and the epoch (the
apps' random windows are drawn from (seed, epoch, i)): it reads indices in order and Lightning saves its
position in every checkpoint (``state_dict``) and hands it back on resume (``load_state_dict``); the batches
already trained on are skipped by index, never loaded.

    def train_dataloader(self):
        return ResumableLoader(dataset, batch_size=8, trainer=self.trainer, drop_last=True)
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["ResumableLoader", "ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """Indices 0, 1, ..., n-1 in order, or this process's share under DDP (rank, rank + world, ...).

    ``set_epoch(e)`` (Lightning calls it before every epoch) is passed on to the dataset when it has one, so
    a dataset that draws item i from (seed, epoch, i) draws a new epoch without its loader being rebuilt.
    ``skip``: the next pass starts after this many indices (a resumed run), later passes are whole. The length
    is always the whole pass: Lightning counts the skipped batches as done.
    """

    def __init__(self, dataset: Dataset, skip: int = 0, drop_last: bool = False):
        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        else:
            world, rank = 1, 0
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(epoch)


class ResumableLoader(DataLoader):
    """A DataLoader over ``dataset`` in index order (``ResumableSampler``) that Lightning resumes mid-epoch.

    ``trainer``: the Trainer that fits with it (a data module passes ``self.trainer``). The position saved in
    a checkpoint is the trainer's count of the batches of this epoch it has trained on, not what the loader
    handed out: Lightning fetches one batch ahead. On resume the first pass starts with the next batch; a
    checkpoint from another epoch (or one saved at an epoch's end) starts the pass at its beginning.
    Other DataLoader arguments (``num_workers``, ``collate_fn``, ``drop_last``, ...) are passed on; the order
    is the sampler's, so ``shuffle`` and ``batch_sampler`` are not accepted. (A ``sampler`` is only for Lightning,
    which rebuilds a loader with one of its own for ``overfit_batches``: that loader starts its passes whole.)
    """

    def __init__(self, dataset: Dataset, batch_size: int | None = 1, trainer: Any = None, **kwargs):
        for name in ("shuffle", "batch_sampler"):
            if kwargs.get(name):
                raise TypeError(f"ResumableLoader reads in index order: {name}= is not supported")
            kwargs.pop(name, None)
        sampler = kwargs.pop("sampler", None) or ResumableSampler(dataset, drop_last=False)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.trainer = trainer
        self.resumed_at = 0  # batches skipped by the last load_state_dict (0: the pass starts at the beginning)

    def _position(self) -> tuple[int, int]:
        """(epoch, batches of it trained on) of the trainer, (0, 0) outside fit."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._position()
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, _ = self._position()
        batches = int(state.get("batches", 0))
        resumable = isinstance(self.sampler, ResumableSampler)
        self.resumed_at = batches if resumable and state.get("epoch") == epoch and 0 < batches < len(self) else 0
        if resumable:
            self.sampler.skip = self.resumed_at * (self.batch_size or 1)
