"""Paper training mechanics as trainer hooks, selected by the recipe.

- TemperatureAnnealing (DY-Conv): tau is a pure function of the global step, so a resumed run
  continues the exact same schedule.
- StructuralRegularization (Structured Convolutions): loss += lam(t) * sum of layer losses.
- Refocus (RefConv): freezing rules for the refocus stage (the frozen basis is a buffer already).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dyconv_repro.errors import UserError


class Hook:
    """Trainer callbacks; every method is optional. `deploy_after_training`: the pipeline deploys the trained
    model into the run directory (deployed.pt + deploy.json) when the run finishes."""

    deploy_after_training = False

    def configure_model(self, model: nn.Module) -> None:
        """Called once with the built model, before the optimizer is built (e.g. to freeze parameters)."""

    def on_train_start(self, trainer) -> None: ...

    def on_step_start(self, trainer) -> None: ...

    def extra_losses(self, trainer) -> dict[str, torch.Tensor]:
        return {}

    def epoch_metrics(self, trainer) -> dict:
        return {}

    def no_decay_params(self, model: nn.Module) -> list[torch.Tensor]:
        return []


def annealed_temperature(step: int, steps_per_epoch: int, init: float, final: float, epochs: float,
                         per: str = "step") -> float:
    """Linear tau from `init` to `final` over `epochs` epochs, then constant.

    per="step": changes every iteration; per="epoch": constant within an epoch.
    """
    total = max(epochs * steps_per_epoch, 1e-12)
    progress = math.floor(step / steps_per_epoch) * steps_per_epoch if per == "epoch" else step
    frac = min(max(progress / total, 0.0), 1.0) if epochs > 0 else 1.0
    return float(init + (final - init) * frac)


class TemperatureAnnealing(Hook):
    def __init__(self, init: float = 30.0, final: float = 1.0, epochs: float = 10, per: str = "step"):
        if per not in ("step", "epoch"):
            raise UserError(f"recipe.temperature.per must be 'step' or 'epoch', got {per!r}")
        self.init, self.final, self.epochs, self.per = float(init), float(final), float(epochs), per
        self.current = float(init)

    def on_train_start(self, trainer) -> None:
        from dyconv_repro.ops.walkers import set_temperature

        set_temperature(trainer.model, self.final)  # each op checks its range before the first step, not mid-run
        if set_temperature(trainer.model, self.init) == 0:
            raise UserError("recipe.temperature is set but the model has no operator with a temperature "
                            "(use op=dynamicconv, odconv or kernelwarehouse, or recipe.temperature=null)")
        self.on_step_start(trainer)

    def on_step_start(self, trainer) -> None:
        from dyconv_repro.ops.walkers import set_temperature

        tau = annealed_temperature(trainer.global_step, trainer.steps_per_epoch, self.init, self.final,
                                   self.epochs, self.per)
        if tau != self.current:
            set_temperature(trainer.model, tau)
            self.current = tau

    def epoch_metrics(self, trainer) -> dict:
        return {"temperature": self.current}


class StructuralRegularization(Hook):
    """total loss = task loss + lam(t) * sum_l ||(I - A A+) W_l|| / ||W_l||, lam warmed up linearly."""

    def __init__(self, lam: float, warmup_epochs: float = 0.0, exclude_from_wd: bool = True):
        self.lam, self.warmup_epochs, self.exclude_from_wd = float(lam), float(warmup_epochs), exclude_from_wd
        self._sum = 0.0
        self._n = 0

    def on_train_start(self, trainer) -> None:
        from dyconv_repro.ops.walkers import structured_layers

        if not structured_layers(trainer.model):
            raise UserError("recipe.structural_reg is set but the model has no structured layer "
                            "(use op=structured, or recipe.structural_reg=null)")

    def current_lam(self, trainer) -> float:
        if self.warmup_epochs <= 0:
            return self.lam
        return self.lam * min(1.0, trainer.global_step / (self.warmup_epochs * trainer.steps_per_epoch))

    def extra_losses(self, trainer) -> dict[str, torch.Tensor]:
        from dyconv_repro.ops.walkers import regularization_loss, structured_layers

        reg = regularization_loss(trainer.model)
        n = max(len(structured_layers(trainer.model)), 1)
        self._sum += reg.item() / n
        self._n += 1
        return {"reg_loss": self.current_lam(trainer) * reg}

    def epoch_metrics(self, trainer) -> dict:
        mean = self._sum / max(self._n, 1)
        self._sum, self._n = 0.0, 0
        return {"reg_loss_mean": mean, "reg_lambda": self.current_lam(trainer)}

    def no_decay_params(self, model: nn.Module) -> list[torch.Tensor]:
        if not self.exclude_from_wd:
            return []
        from dyconv_repro.ops.walkers import structured_layers

        return [p for _, layer in structured_layers(model) for p in layer.parameters(recurse=False)]


class Refocus(Hook):
    """RefConv refocus stage: the bases stay frozen; optionally freeze BN / classifier / everything else. Its
    deliverable is the re-parameterized plain model, so the pipeline deploys it after training."""

    deploy_after_training = True

    def __init__(self, freeze_bn: bool = False, freeze_classifier: bool = False, freeze_others: bool = False,
                 **_ignored):
        self.freeze_bn, self.freeze_classifier, self.freeze_others = freeze_bn, freeze_classifier, freeze_others

    def configure_model(self, model: nn.Module) -> None:
        """Set requires_grad before the optimizer is built."""
        from dyconv_repro.ops.walkers import refconv_layers

        layers = list(refconv_layers(model))
        if not layers:
            raise UserError("recipe.refocus is set but the model has no RefConv layer (use op=refconv)")
        # the refocusing convs (and the basis itself when op.kwargs.train_basis: it is then a Parameter)
        refocus_params = {id(p) for _, layer in layers for p in layer.parameters()}
        classifier = _classifier(model)
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if id(p) in refocus_params:
                    continue
                is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
                is_cls = classifier is not None and module is classifier
                if self.freeze_others or (is_bn and self.freeze_bn) or (is_cls and self.freeze_classifier):
                    p.requires_grad_(False)

    def on_step_start(self, trainer) -> None:
        if self.freeze_bn or self.freeze_others:  # frozen BN also keeps its running statistics
            for m in trainer.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


def _classifier(model: nn.Module) -> nn.Module | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


def build_hooks(recipe) -> list[Hook]:
    """The paper mechanics a (validated) recipe switches on; null = off."""
    hooks: list[Hook] = []
    if recipe.temperature:
        t = recipe.temperature
        hooks.append(TemperatureAnnealing(t.init, t.final, t.epochs, t.per))
    if recipe.structural_reg:
        s = recipe.structural_reg
        hooks.append(StructuralRegularization(s.lam, s.warmup_epochs, s.exclude_from_wd))
    if recipe.refocus:
        r = recipe.refocus
        hooks.append(Refocus(r.freeze_bn, r.freeze_classifier, r.freeze_others))
    return hooks
