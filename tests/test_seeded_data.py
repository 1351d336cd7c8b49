"""Per-sample seeded augmentation (data/seeded.py): a resumed epoch starts at its batch without decoding the
batches before it, stays bit-exact, and a run's data does not depend on the number of loader workers."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, RandomSampler

from dyconv_repro.data.seeded import SeededDataset, SeededSampler, sample_seed
from dyconv_repro.pipeline import train_run as train

from .test_train import _weights, run_killed, run_killed_then_resumed


class _Draws(Dataset):
    """Each sample is one draw from each generator: what a random crop or flip would consume."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return i, torch.rand(()).item(), random.random(), float(np.random.rand())


def _sampler(seed=3):
    return SeededSampler(RandomSampler(range(10), generator=torch.Generator().manual_seed(seed)))


def test_skipping_keeps_the_order_and_the_seeds_of_the_positions_after_it():
    full = list(_sampler())
    skipped = _sampler()
    skipped.skip_next(4)
    assert list(skipped) == full[4:]
    assert len({seed for _, seed in full}) == 10


def test_a_skip_lasts_one_epoch_and_the_epoch_seed_changes_every_seed():
    sampler = SeededSampler(RandomSampler(range(10), generator=torch.Generator()))
    sampler.base.generator.manual_seed(0)
    sampler.skip_next(3)
    assert len(list(sampler)) == 7
    sampler.base.generator.manual_seed(0)
    first = list(sampler)
    sampler.epoch_seed = 1
    sampler.base.generator.manual_seed(0)
    second = list(sampler)
    assert [i for i, _ in first] == [i for i, _ in second]  # the order is the base sampler's
    assert not {s for _, s in first} & {s for _, s in second}


def test_a_sample_is_a_function_of_its_seed_and_leaves_the_main_generators_alone():
    data = SeededDataset(_Draws())
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    a, b, c = data[(2, sample_seed(5, 0))], data[(2, sample_seed(5, 0))], data[(2, sample_seed(5, 1))]
    assert a == b and a[1:] != c[1:] and all(x != y for x, y in zip(a[1:], c[1:]))
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_seeds_differ_for_nearby_epochs_and_positions():
    seeds = {sample_seed(e, p) for e in range(50) for p in range(200)}
    assert len(seeds) == 50 * 200 and all(0 <= s < 2 ** 63 for s in seeds)


ARGS = ["trainer.epochs=2", "trainer.max_steps_per_epoch=4", "recipe.batch_size=32",
        "trainer.checkpoint_every_steps=2", "model.dropout=0.1"]


def test_a_mid_epoch_resume_decodes_only_the_batches_it_trains_on(make_cfg, monkeypatch):
    state = run_killed(make_cfg, monkeypatch, ARGS, kill_step=6)
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)  # epoch 2, batch 2 (0-based)
    decoded = []
    real = SeededDataset.__getitem__
    monkeypatch.setattr(SeededDataset, "__getitem__", lambda self, key: decoded.append(key) or real(self, key))
    summary = train(make_cfg(*ARGS, "run_name=killed", "trainer.resume=auto"))
    assert summary["status"] == "finished"
    assert len(decoded) == (4 - 2) * 32  # the last two batches of epoch 2, not the whole epoch again


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_and_the_data_does_not_depend_on_the_workers(make_cfg, monkeypatch, workers):
    args = [*ARGS, f"data.num_workers={workers}"]
    full0 = train(make_cfg(*ARGS, "run_name=full0"))
    _, resumed = run_killed_then_resumed(make_cfg, monkeypatch, args, kill_step=6)
    a, b = _weights(Path(full0["run_dir"])), _weights(Path(resumed["run_dir"]))
    for k in a:
        assert torch.equal(a[k], b[k]), k
