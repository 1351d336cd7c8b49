"""What the first GPU user hits, checked on CPU: channels_last, AMP, gradient accumulation, Slurm DDP groups,
resume on another world size, the CUDA defaults and the trainer's device setup."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dyconv_repro.engine.device import configure_cuda, constant_buffer_names, to_channels_last
from dyconv_repro.engine.distributed import slurm_env
from dyconv_repro.models.registry import BACKBONES
from dyconv_repro.ops import OPS, build_op
from dyconv_repro.ops.engine import DynamicConvOp
from dyconv_repro.pipeline import train_run as train

CL = torch.channels_last
TINY = ["trainer.epochs=1", "trainer.max_steps_per_epoch=2", "recipe.batch_size=16"]
DYNAMIC = [n for n in OPS.names() if issubclass(OPS.get(n), DynamicConvOp)]


@pytest.mark.parametrize("name", DYNAMIC)
def test_dynamic_ops_keep_channels_last(name):
    """A channels_last input gives a channels_last output (training and eval), so the next static layer pays no
    layout conversion; values equal the NCHW run."""
    torch.manual_seed(0)
    for k, groups in ((3, 1), (3, 8), (1, 1)):
        op = build_op(name, 8, 8, k, groups=groups)
        x = torch.randn(3, 8, 9, 9)
        for train_mode in (True, False):
            op.train(train_mode)
            y = op(x.to(memory_format=CL).requires_grad_(train_mode))
            assert y.is_contiguous(memory_format=CL), (name, k, groups, train_mode)
            torch.testing.assert_close(y, op(x), atol=1e-5, rtol=1e-4)


def test_to_channels_last_skips_the_kernel_banks():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), build_op("dynamicconv", 8, 8, 3), build_op("condconv", 8, 8, 3))
    with pytest.raises(RuntimeError, match="rank 4"):
        model.to(memory_format=CL)  # what trainer.channels_last=true used to do
    to_channels_last(model)
    assert model[0].weight.is_contiguous(memory_format=CL) and model[1].weight.dim() == 5


@pytest.mark.parametrize("op", ["dynamicconv", "condconv", "dynet"])
def test_dynamic_op_trains_with_channels_last(make_cfg, op):
    summary = train(make_cfg(f"op={op}", "trainer.channels_last=true", *TINY))
    assert summary["status"] == "finished" and summary["steps"] == 2


@pytest.mark.parametrize("op", sorted(OPS.names()))
def test_every_op_trains_one_step_under_bf16(make_cfg, op):
    """CPU autocast takes the same aten paths as CUDA's; structured runs with its regularization loss."""
    extra = ["recipe.structural_reg={lam: 0.1, warmup_epochs: 0, exclude_from_wd: false}"] if op == "structured" else []
    if op == "mixconv":
        extra.append("policy=all")  # ResNet-20 has no depthwise conv for MixConv's paper placement
    summary = train(make_cfg(f"op={op}", "trainer.amp=bf16", *TINY, "trainer.max_steps_per_epoch=1", *extra))
    assert summary["status"] == "finished"
    metrics = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in metrics)


def test_structural_loss_is_fp32_under_autocast():
    op = build_op("structured", 8, 8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = op.regularization_loss()
        y = op(torch.randn(2, 8, 5, 5))
    assert loss.dtype == torch.float32 and y.dtype == torch.bfloat16


def _no_bn(model_cfg, num_classes, image_size):
    """A backbone without BatchNorm: micro-batches then see exactly what one big batch sees."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


@pytest.fixture
def no_bn_backbone():
    BACKBONES.add("test_no_bn", _no_bn)
    yield "test_no_bn"
    BACKBONES.unregister("test_no_bn")


def test_gradient_accumulation_equals_one_large_batch(make_cfg, no_bn_backbone):
    """4 micro-batches of 8 == one batch of 32: the weights after the optimizer steps (CPU, fp32)."""
    weights = []
    for accumulate in (1, 4):
        summary = train(make_cfg(f"model.name={no_bn_backbone}", "op=dynamicconv", "policy=all", "trainer.epochs=1",
                                 "trainer.max_steps_per_epoch=2", "recipe.batch_size=32",
                                 f"recipe.accumulate_steps={accumulate}", f"run_name=acc{accumulate}"))
        assert summary["accumulate_steps"] == accumulate and summary["steps"] == 2
        state = torch.load(Path(summary["run_dir"]) / "checkpoints" / "last.pt", weights_only=False)["model"]
        weights.append(state)
    assert any("weight" in k and v.dim() == 5 for k, v in weights[0].items())  # the dynamic op was there
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], atol=2e-6, rtol=1e-5, msg=k)


def test_accumulate_steps_must_divide_the_batch(make_cfg):
    from dyconv_repro.errors import UserError

    with pytest.raises(UserError, match="accumulate_steps"):
        train(make_cfg("recipe.batch_size=30", "recipe.accumulate_steps=4", *TINY[:2]))


def test_slurm_variables_become_a_process_group_spec():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "4242"}
    assert slurm_env(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                              "MASTER_PORT": "24242"}
    assert slurm_env({**env, "WORLD_SIZE": "8"}) == {}  # torchrun's variables win
    assert slurm_env({**env, "SLURM_NTASKS": "1"}) == {}  # one task: no group


SLURM_TASK = r"""
import torch, torch.distributed as dist
from dyconv_repro.engine.distributed import init_distributed, shutdown_distributed
info = init_distributed("cpu")
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
print(f"rank={info.rank} world={info.world_size} local={info.local_rank} sum={t.item():g}", flush=True)
shutdown_distributed()
"""


def test_two_fake_slurm_tasks_form_one_ddp_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_ID="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", SLURM_TASK], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-2000:]
        assert f"rank={rank} world=2 local={rank} sum=3" in out


def test_resume_with_another_world_size_continues_and_says_what_it_lost(make_cfg, monkeypatch, capsys):
    import dyconv_repro.pipeline.train as trainer_mod
    from tests.test_train import _KillAt

    args = ["trainer.epochs=1", "trainer.max_steps_per_epoch=4", "recipe.batch_size=16",
            "trainer.checkpoint_every_steps=2", "run_name=worlds"]
    real = trainer_mod.build_hooks
    monkeypatch.setattr(trainer_mod, "build_hooks", lambda recipe: real(recipe) + [_KillAt(3)])
    cfg = make_cfg(*args)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(trainer_mod, "build_hooks", real)
    (last,) = [p for p in (Path(cfg.output_dir) / "worlds").glob("*/checkpoints/last.pt")
               if not p.parent.parent.is_symlink()]  # not via the `latest` link
    state = torch.load(last, weights_only=False)
    assert state["batch_in_epoch"] == 2 and state["world_size"] == 1
    state["world_size"] = 2  # as if two processes had written it
    torch.save(state, last)
    capsys.readouterr()
    summary = train(make_cfg(*args, "trainer.resume=auto"))
    out = capsys.readouterr().out
    assert summary["status"] == "finished" and summary["steps"] == 4
    assert "written by 2 process(es), resuming with 1" in out and "not restored" in out


def test_cuda_defaults_and_deterministic_switch(make_cfg):
    cfg = make_cfg()
    assert cfg.trainer.deterministic is False and cfg.trainer.cudnn_benchmark is True and cfg.trainer.tf32 is True
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        assert configure_cuda(False, True, True) == {"deterministic": False, "cudnn_benchmark": True, "tf32": True}
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        assert configure_cuda(True, True, False) == {"deterministic": True, "cudnn_benchmark": False, "tf32": False}
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
         torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved


def test_constant_buffers_are_kept_out_of_ddp_broadcasts():
    model = nn.Sequential(build_op("refconv", 8, 8, 3), build_op("dynamicconv", 8, 8, 3), nn.BatchNorm2d(8),
                          build_op("structured", 8, 8, 3))
    names = constant_buffer_names(model)
    assert "0.weight" in names and "1.temperature" in names and "3.basis0" in names
    assert not any(n.startswith("2.") for n in names)  # BN statistics are still broadcast


def test_trainer_conv_path_forces_the_dynamic_path(make_cfg):
    summary = train(make_cfg("op=dynamicconv", "trainer.conv_path=loop", *TINY))
    assert summary["status"] == "finished"
    from dyconv_repro.errors import UserError

    with pytest.raises(UserError, match="conv_path"):
        train(make_cfg("op=dynamicconv", "trainer.conv_path=warp", *TINY))
