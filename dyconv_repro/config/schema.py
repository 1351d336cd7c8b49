"""The schema of a composed config: one dataclass per group with its keys, their types and their valid ranges.

The values live in the YAML files (configs/<group>/*.yaml; recipes extend configs/recipe/base.yaml); a key
with a default here is an optional knob that only some files set. `validate()` (config/validate.py) merges a
composed config onto `TrainConfig`, so a wrong type, an unknown key (`+trainer.epoch=3`) or a value out of
range is one line before anything runs. Operator options (`op.kwargs`) are checked by the operator itself.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any


def key(default: Any = MISSING, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
        le: float | None = None, choices: tuple | None = None, factory=None):
    """A schema field with an optional range or set of choices (checked by config/validate.py)."""
    meta = {k: v for k, v in dict(gt=gt, ge=ge, lt=lt, le=le, choices=choices).items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = key()
    root: str | None = key()
    num_classes: int = key(gt=0)
    image_size: int = key(gt=0)
    num_workers: int = key(0, ge=0)
    prefetch_factor: int | None = key(None, gt=0)
    pin_memory: bool = key(False)
    download: bool = key(False)
    augment: bool = key(True)                  # CIFAR / digits: pad-4 crop (+ flip for CIFAR)
    val_fraction: float | None = key(None, gt=0, lt=1)   # digits: held-out share
    interpolation: str = key("bilinear", choices=("bilinear", "bicubic", "nearest"))
    train_size: int | None = key(None, gt=0)   # fake data
    val_size: int | None = key(None, gt=0)
    eval_crop_pct: float | None = key(None, gt=0, le=1)  # ImageNet: resize 1/pct, center crop


@dataclass
class ModelConfig:
    name: str = key()
    source: str = key(choices=("dyconv", "torchvision", "timm"))
    num_classes: int = key(gt=0)
    width_mult: float | None = key(gt=0)
    dropout: float | None = key(ge=0, lt=1)
    cifar_stem: Any = key(choices=("auto", True, False))
    pretrained: Any = key()                    # false | true | path to a state_dict file
    init_from: str | None = key()
    kwargs: dict[str, Any] = key(factory=dict)
    shortcut: str | None = key(None, choices=("A", "B"))  # CIFAR ResNets


@dataclass
class OpConfig:
    name: str = key()
    kwargs: dict[str, Any] = key(factory=dict)  # validated by the operator's constructor


@dataclass
class PolicyConfig:
    name: str = key()
    roles: list[str] = key()
    kernel_sizes: list[int] | None = key(None)
    stages: list[int] | None = key(None)
    min_channels: int = key(0, ge=0)
    block_routing: bool = key(False)
    copy_weights: bool = key(False)
    role_kwargs: dict[str, Any] = key(factory=dict)
    exclude: list[str] = key(factory=list)
    allow_empty: bool = key(False)


@dataclass
class EmaConfig:
    enabled: bool = key()
    decay: float = key(gt=0, lt=1)


@dataclass
class AugConfig:
    auto_augment: str | None = key()
    color_jitter: float = key(ge=0)
    re_prob: float = key(ge=0, le=1)


@dataclass
class TemperatureConfig:  # DY-Conv
    init: float = key(ge=0)       # each op checks its own range (DY-Conv/ODConv tau > 0, KernelWarehouse t in [0, 1])
    final: float = key(ge=0)
    epochs: float = key(ge=0)
    per: str = key("step", choices=("step", "epoch"))


@dataclass
class StructuralRegConfig:  # Structured Convolutions
    lam: float = key(ge=0)
    warmup_epochs: float = key(0.0, ge=0)
    exclude_from_wd: bool = key(False)


@dataclass
class RefocusConfig:  # RefConv
    freeze_bn: bool = key(False)
    freeze_classifier: bool = key(False)
    freeze_others: bool = key(False)


@dataclass
class RecipeConfig:
    name: str = key()
    source: str = key()                         # where the values come from (configs/recipe/<name>.yaml header)
    epochs: int = key(gt=0)
    batch_size: int = key(gt=0)
    accumulate_steps: int = key(gt=0)
    lr: float = key(gt=0)
    lr_base_batch: int | None = key(gt=0)
    optimizer: str = key()
    momentum: float = key(ge=0, lt=1)
    nesterov: bool = key()
    rmsprop_decay: float = key(gt=0, lt=1)
    opt_eps: float = key(gt=0)
    weight_decay: float = key(ge=0)
    wd_skip_bn_bias: bool = key()
    scheduler: str = key(choices=("cosine", "step", "multistep", "linear", "none"))
    warmup_epochs: float = key(ge=0)
    warmup_lr: float = key(ge=0)
    warmup_prefix: bool = key()
    min_lr: float = key(ge=0)
    decay_epochs: float = key(gt=0)
    decay_milestones: list[int] = key()
    decay_rate: float = key(gt=0)
    label_smoothing: float = key(ge=0, lt=1)
    mixup: float = key(ge=0)
    cutmix: float = key(ge=0)
    grad_clip: float | None = key(gt=0)
    ema: EmaConfig = key()
    aug: AugConfig = key()
    temperature: TemperatureConfig | None = key()
    structural_reg: StructuralRegConfig | None = key()
    refocus: RefocusConfig | None = key()
    provenance: dict[str, str] = key(factory=dict)  # key -> note for a value that departs from `source`


@dataclass
class TrainerConfig:
    epochs: int = key(gt=0)
    device: str = key()
    amp: Any = key(choices=(False, None, "bf16", "fp16"))
    channels_last: bool = key()
    compile: bool = key()
    cpu_heap: str = key(choices=("keep", "default"))
    eval_every: int = key(gt=0)
    progress: bool = key()
    log_every: int = key(gt=0)
    resume: str | None = key()
    checkpoint_every_steps: int = key(ge=0)
    max_steps_per_epoch: int | None = key(gt=0)
    deterministic: bool = key()
    cudnn_benchmark: bool = key()
    tf32: bool = key()
    sync_bn: bool = key()
    conv_path: str = key()                     # checked against the engine's paths when the model is built
    evaluate_only: bool = key(False)             # evaluate model.init_from's weights once; no training step
    bn_recalibrate: int = key(0, ge=0)          # batches; engine/bn_recalibration.py


@dataclass
class LoggerConfig:
    name: str = key(choices=("local", "wandb"))
    mode: str = key("offline", choices=("offline", "online", "disabled"))
    project: str | None = key(None)
    entity: str | None = key(None)
    tags: list[str] = key(factory=list)


@dataclass
class PipelineStage:
    name: str = key()
    overrides: list[str] = key(factory=list)
    init_from: str | None = key(None)           # an earlier stage whose checkpoint starts this one
    init_ckpt: str = key("best", choices=("best", "last"))


@dataclass
class TrainConfig:
    data: DataConfig = key()
    model: ModelConfig = key()
    op: OpConfig = key()
    policy: PolicyConfig = key()
    recipe: RecipeConfig = key()
    trainer: TrainerConfig = key()
    logger: LoggerConfig = key()
    seed: int = key(ge=0)
    run_name: str = key()
    run_id: str | None = key()
    output_dir: str = key()
    pipeline: list[PipelineStage] | None = key(None)  # multi-stage runs (pipeline/stages.py)
    stage: str | None = key(None)               # set by the pipeline for each stage
    experiment_id: str | None = key(None)       # experiment/<paper>/<row> the run was composed from
    provenance: dict[str, str] = key(factory=dict)  # a row's departures: full key (model.dropout) -> why


GROUPS = ("data", "model", "op", "policy", "recipe", "trainer", "logger")
