"""Precise-BN recalibration: the running statistics become the plain average over the given batches, the
training RNG streams are untouched, and a trainer run with it records it and evaluates with it."""

import torch
from torch import nn

from dyconv_repro.engine.bn_recalibration import recalibrate_bn


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g) * (i + 1) + i, torch.zeros(8, dtype=torch.long)) for i in range(n)]


def test_running_stats_are_the_average_over_the_batches_and_rng_is_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.eval()
    data = _batches()
    with torch.no_grad():
        feats = [model[0](x) for x, _ in data]
    want_mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    want_var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    # a shuffled loader over the same batches: iterating it advances its sampler's generator
    gen = torch.Generator().manual_seed(7)
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=torch.utils.data.RandomSampler(data, generator=gen))
    gen_state, global_state = gen.get_state(), torch.get_rng_state()
    used = recalibrate_bn(model, loader, torch.device("cpu"), num_batches=3, generator=gen)
    assert used == 3
    torch.testing.assert_close(model[1].running_mean, want_mean)
    torch.testing.assert_close(model[1].running_var, want_var)
    assert model[1].momentum == 0.1 and not model.training  # restored
    assert torch.equal(gen.get_state(), gen_state) and torch.equal(torch.get_rng_state(), global_state)


def test_num_batches_caps_the_loader_and_zero_is_a_no_op():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = model[1].running_var.clone()
    assert recalibrate_bn(model, _batches(), torch.device("cpu"), num_batches=0) == 0
    assert torch.equal(model[1].running_var, before)
    assert recalibrate_bn(model, _batches(5), torch.device("cpu"), num_batches=2) == 2
    assert model[1].num_batches_tracked.item() == 2


def test_trainer_recalibrates_before_evaluating(tmp_path):
    from dyconv_repro.config import compose
    from dyconv_repro.pipeline import train_run as train

    cfg = compose(["trainer.epochs=1", "trainer.max_steps_per_epoch=2", "trainer.bn_recalibrate=3",
                   "trainer.progress=false", f"output_dir={tmp_path}", "run_name=recal", "logger=local"])
    summary = train(cfg)
    assert summary["status"] == "finished"
    saved = torch.load(tmp_path / "recal" / "latest" / "checkpoints" / "last.pt", map_location="cpu",
                       weights_only=False)
    tracked = [v for k, v in saved["model"].items() if k.endswith("num_batches_tracked")]
    # update_bn resets the counters and then counts the 3 recalibration batches (not the 2 training steps)
    assert tracked and all(int(t) == 3 for t in tracked)
