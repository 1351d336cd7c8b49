"""Runs as the user asked for them: build the model and its paper hooks, train, then the post-training stages.

- `train_run(cfg)` (pipeline/train.py): one run -- validate, build, train, deploy when the recipe asks for it.
- `run_pipeline(cfg)` (pipeline/stages.py): an experiment's stages in order (e.g. RefConv: baseline, refocus).
- `deploy_model` / `save_deployed` (pipeline/deploy.py): verify, count and save a deployed model.
"""

from dyconv_repro.pipeline.stages import run_pipeline
from dyconv_repro.pipeline.train import train_run

__all__ = ["run_pipeline", "train_run"]
