"""The two synthetic tasks: seeded batches, the endless training stream, and which positions must be written.

Vocabulary 16. Induction heads: token 0 is the trigger, 1..15 content. Selective copying: 0 noise, 1 the
recall marker, 2..15 data; 16 data tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

__all__ = ["VOCAB", "TASKS", "EVAL_SEED", "TRIGGER", "NOISE", "RECALL", "N_DATA", "MAKE_BATCH", "N_TARGETS",
           "induction_batch", "copying_batch", "TaskStream", "write_mask"]

VOCAB = 16
TASKS = ("induction", "copying")
EVAL_SEED = 1234  # evaluation sequences come from their own generator, never the training stream
TRIGGER = 0  # induction heads: token 0 is the trigger, 1..15 content
NOISE, RECALL, N_DATA = 0, 1, 16  # selective copying: 0 noise, 1 recall marker, 2..15 data; 16 data tokens


def induction_batch(batch: int, L: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(ids (batch, L), targets (batch, 1)). Content tokens uniform in 1..15; the trigger at a random p in
    the first half (p + 1 < L // 2 so the key is in the first half too), the key at p + 1 and the trigger
    again as the last token, whose target is the key."""
    if L < 8:
        raise ValueError(f"induction: L must be >= 8, got {L}")
    ids = torch.randint(1, VOCAB, (batch, L), generator=gen)
    p = torch.randint(0, L // 2 - 1, (batch,), generator=gen)
    rows = torch.arange(batch)
    ids[rows, p] = TRIGGER
    ids[:, -1] = TRIGGER
    return ids, ids[rows, p + 1].unsqueeze(1)


def copying_batch(batch: int, L: int, gen: torch.Generator, n_data: int = N_DATA) -> tuple[Tensor, Tensor]:
    """(ids (batch, L + n_data), targets (batch, n_data)). L noise positions, n_data (16) of them replaced by
    data tokens (uniform in 2..15) at random distinct positions, then n_data recall markers; the targets at
    the markers are the data tokens in order of position."""
    if L < n_data:
        raise ValueError(f"copying: L must be >= n_data={n_data}, got {L}")
    pos = torch.rand(batch, L, generator=gen).argsort(dim=1)[:, :n_data].sort(dim=1).values
    data = torch.randint(RECALL + 1, VOCAB, (batch, n_data), generator=gen)
    ids = torch.full((batch, L + n_data), NOISE, dtype=torch.long)
    ids.scatter_(1, pos, data)
    ids[:, L:] = RECALL
    return ids, data


MAKE_BATCH = {"induction": induction_batch, "copying": copying_batch}
N_TARGETS = {"induction": 1, "copying": N_DATA}


class TaskStream(IterableDataset):
    """Fresh batches forever from one seeded generator: the training stream is a function of the seed.
    ``L`` may be changed between batches (the length curriculum); read in the main process (num_workers=0)."""

    def __init__(self, task: str, batch: int, L: int, seed: int):
        self.task, self.batch, self.L, self.seed = task, batch, L, seed

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield MAKE_BATCH[self.task](self.batch, self.L, gen)


def write_mask(task: str, ids: Tensor) -> Tensor:
    """(batch, T) bool: the positions a model must write into its state (induction: the key after the first
    trigger; copying: the data tokens)."""
    if task == "induction":
        mask = torch.zeros_like(ids, dtype=torch.bool)
        p = (ids[:, :-1] == TRIGGER).float().argmax(1)
        mask[torch.arange(len(ids)), p + 1] = True
        return mask
    return ids > RECALL
