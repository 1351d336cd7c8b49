"""`dyconv-train`: the Hydra entry point (single runs, `-m` sweeps, torchrun, submitit).

    dyconv-train                                          # CIFAR ResNet-20 on the offline digits data
    dyconv-train model=mobilenet_v2 op=dynamicconv data=cifar10
    dyconv-train -m recipe.lr=0.05,0.1 trainer.epochs=1   # two runs, two run directories
    torchrun --nproc_per_node=2 -m dyconv_repro.cli.train trainer.device=cpu

In a multirun a failed job writes error.txt + summary.json (status failed) into its run directory
and the sweep goes on with the next job; each job's folder under the sweep dir links to its run
(`<sweep dir>/<n>/run`), so `dyconv-compare --sweep <sweep dir>` ranks exactly that sweep's runs.
"""

from __future__ import annotations

import logging
import sys
import traceback

import hydra
from omegaconf import DictConfig, open_dict

from dyconv_repro.config_dir import config_dir
from dyconv_repro.errors import RunStopped, UserError
from dyconv_repro.pipeline import run_pipeline

log = logging.getLogger("dyconv")


def _experiment_id() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("experiment")
    except Exception:  # noqa: BLE001 - not under Hydra (e.g. called from Python)
        return None


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001
        return False


def run(cfg: DictConfig) -> dict:
    """Train (one stage or a pipeline of stages) from a composed config."""
    with open_dict(cfg):
        if cfg.get("experiment_id") is None:  # (validated after this)
            cfg.experiment_id = _experiment_id()
    return run_pipeline(cfg)


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    """Exit codes: 0 finished (or already finished), 1 failed (error.txt in the run directory), 2 bad input,
    130 Ctrl-C, 143 SIGTERM; the last four print one line on stderr. In a multirun a failed or refused job
    returns None to the sweeper and the sweep goes on; a signal stops the whole sweep."""
    try:
        summary = run(cfg)
        return summary.get("best_top1")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if _is_multirun():
            return None
        raise SystemExit(2) from None
    except RunStopped as e:
        print(e, file=sys.stderr)
        if _is_multirun() and e.exit_code == 1:
            return None
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception:  # noqa: BLE001
        if _is_multirun():  # a failed row must not stop the others
            traceback.print_exc()
            return None
        raise


def composes_or_exit(argv: list[str]) -> None:
    """A single run's overrides that Hydra cannot compose (an unknown group option, a key it cannot override)
    are one `error:` line and exit 2, like every other bad input; Hydra's own report is several lines and exit 1.
    Sweeps (`-m`) and Hydra's flags (`--cfg`, `--help`, ...) go to Hydra unchanged."""
    if any(a.startswith("-") for a in argv):
        return
    from dyconv_repro.config.compose import _raw_compose

    try:
        _raw_compose(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    """`dyconv-train [overrides]` (and `python -m dyconv_repro.cli.train`, e.g. under torchrun)."""
    composes_or_exit(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
