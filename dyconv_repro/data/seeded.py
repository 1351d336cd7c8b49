"""Training samples whose augmentation is a pure function of (run seed, epoch, rank, position in the epoch).

Why: with the random state of DataLoader workers, a sample's crop and flip depend on which worker decoded
it and on everything that worker decoded before. Then a resumed run can only be exact if it decodes
again every batch before its checkpoint, and a run with 8 workers differs from a run with 0. Here the
sampler hands each position a seed with its index (`SeededSampler`). The dataset wrapper
(`SeededDataset`) seeds torch, Python and NumPy's generators with it for that one sample only. So:

* a mid-epoch resume skips the batches before its checkpoint in the sampler, without decoding them
  (`SeededSampler.skip_next`), and still sees the same crops as the uninterrupted run;
* the data a run sees does not depend on `data.num_workers`, `persistent_workers` or prefetching.

In the main process (num_workers=0) the generators' state is saved and restored around each sample, so data
loading does not touch the random stream that dropout, drop-path and mixup draw from.

Cost per sample (2-core VM): about 8 us in a worker (three seeds), about 100 us in the main process
(NumPy's state save and restore takes most of it). Decoding and augmenting one sample takes longer than
either: about 100 us for a CIFAR image, and milliseconds for an ImageNet JPEG.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive (epoch seed, position) pairs apart


def sample_seed(epoch_seed: int, position: int) -> int:
    """A 63-bit seed for the sample at `position` of the epoch seeded `epoch_seed` (a SplitMix64 step)."""
    z = (epoch_seed * _MIX + position + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


class SeededSampler(Sampler):
    """Yields (index, seed) for each index of `base`, where seed = sample_seed(epoch_seed, position).

    The trainer sets `epoch_seed` at the start of every epoch, and `skip_next(n)` before a resumed epoch.
    The first n positions are then drawn from `base`, so the order is unchanged, but they are not yielded.
    """

    def __init__(self, base: Sampler):
        self.base = base
        self.epoch_seed = 0
        self._skip = 0

    def skip_next(self, n: int) -> None:
        """The next iteration starts at position n (a one-shot: later epochs start at 0)."""
        self._skip = int(n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, self._skip = self._skip, 0
        for position, index in enumerate(self.base):
            if position >= skip:
                yield int(index), sample_seed(self.epoch_seed, position)

    def __len__(self) -> int:
        return len(self.base)


class SeededDataset(Dataset):
    """`base[index]` computed with torch, random and numpy seeded by the seed the sampler paired with it."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        if get_worker_info() is not None:  # a worker's generators belong to data loading alone
            _seed_all(seed)
            return self.base[index]
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            _seed_all(seed)
            try:
                return self.base[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def _seed_all(seed: int) -> None:
    # the CPU generator only (torch.manual_seed also seeds every accelerator: 75 us against 1 us a sample)
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
