"""Loading weights with a printed key report: loaded / missing / unexpected / shape-mismatched.

Loading fails (UserError naming the keys) unless every difference is explicitly allowed:
BN `num_batches_tracked` counters, keys an operator declares in `allowed_missing_keys` (glob
patterns relative to the op, e.g. RefConv's refocusing weight), and -- for ImageNet weights only --
the classifier when num_classes differs. There is no silent `strict=False`.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from dyconv_repro.errors import UserError

ALWAYS_ALLOWED_MISSING = ("*num_batches_tracked",)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class KeyReport:
    """What a checkpoint would do to a model; `ok` when every difference is allowed."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)  # differences that were explicitly allowed

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)

    def summary(self) -> str:
        return (f"[weights] {self.source}: {len(self.loaded)} loaded, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched"
                + (f", {len(self.allowed)} allowed ({_first(self.allowed, 4)})" if self.allowed else ""))

    def error(self, hint: str = "") -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing [{_first(self.missing)}]")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected [{_first(self.unexpected)}]")
        if self.mismatched:
            mm = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]
            parts.append(f"{len(self.mismatched)} shape-mismatched [{_first(mm)}]")
        return (f"checkpoint {self.source} does not fit the model: {'; '.join(parts)}. "
                + (hint or "Build the same backbone/op/policy the checkpoint was saved from."))


def _first(items: list, n: int = 10) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def op_allowed_missing(model: nn.Module) -> list[str]:
    """Glob patterns of keys that operators declare may be absent from a checkpoint."""
    pats = []
    for name, m in model.named_modules():
        for p in getattr(m, "allowed_missing_keys", ()) or ():
            pats.append(f"{name}.{p}" if name else p)
    return pats


def extract_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state_dict inside our run checkpoints ({'model': ...}), {'state_dict': ...} or a plain one."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{source} holds no state_dict (expected a dict of tensors or {{'model': state_dict}})")
    sd = dict(obj)
    for prefix in _WRAPPER_PREFIXES:  # DDP / torch.compile wrappers
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (or a run directory: its checkpoints/best.pt, else last.pt) and return its model
    state_dict."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        found = [path / "checkpoints" / n for n in ("best.pt", "last.pt") if (path / "checkpoints" / n).is_file()]
        if not found:
            raise UserError(f"run directory {path} has no checkpoints/best.pt or checkpoints/last.pt")
        path = found[0]
    if not path.is_file():
        raise UserError(f"checkpoint file {path} does not exist; pass the path of a .pt/.pth file or a run directory")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - our run checkpoints may hold non-tensor objects
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot read checkpoint {path}: {e}") from None
    return extract_state_dict(obj, str(path))


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                     allow_missing: Iterable[str] = (), allow_unexpected: Iterable[str] = (),
                     allow_mismatch: Iterable[str] = ()) -> KeyReport:
    """Compare without loading; allowed differences go to `report.allowed`."""
    own = model.state_dict()
    allow_missing = list(allow_missing) + list(ALWAYS_ALLOWED_MISSING) + op_allowed_missing(model)
    rep = KeyReport(source)
    for k, v in own.items():
        if k not in state_dict:
            (rep.allowed if _matches(k, allow_missing) else rep.missing).append(k)
        elif tuple(state_dict[k].shape) != tuple(v.shape):
            if _matches(k, allow_mismatch):
                rep.allowed.append(k)
            else:
                rep.mismatched.append((k, tuple(state_dict[k].shape), tuple(v.shape)))
        else:
            rep.loaded.append(k)
    for k in state_dict:
        if k not in own:
            (rep.allowed if _matches(k, allow_unexpected) else rep.unexpected).append(k)
    return rep


def timm_condconv_layout(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's CondConv EfficientNet (`efficientnet_cc_b0_4e`, ...) -> ours: CondConv2d stores the experts flat,
    weight [E, out*in/g*k*k] (each row one (out, in/g, k, k) kernel), and each block's router as `routing_fn`
    (Linear on the pooled block input, sigmoid), which is our block router `block_router.heads.0.body`. Only
    exact equivalents are renamed/reshaped; anything else is left for check_state_dict to report."""
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        target = own.get(k)
        if (target is not None and v.dim() == 2 and target.dim() == 5 and v.shape[0] == target.shape[0]
                and v.numel() == target.numel()):
            out[k] = v.reshape(target.shape)
            continue
        head, sep, tail = k.rpartition(".routing_fn.")
        renamed = f"{head}.block_router.heads.0.body.{tail}" if sep else None
        if renamed is not None and k not in own and renamed in own and own[renamed].shape == v.shape:
            out[renamed] = v
        else:
            out[k] = v
    return out


# other libraries' layouts of the same operators: name -> (model, state_dict) -> state_dict; tried in order
# when a checkpoint does not fit as is, used only when the remapped one fits completely
LAYOUTS = {"timm CondConv2d": timm_condconv_layout}


def load_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, hint: str = "",
                 verbose: bool = True, **allow) -> KeyReport:
    """Load `state_dict` into `model` after `check_state_dict`; a checkpoint in another library's layout of the
    same operators (LAYOUTS) is remapped when every tensor then fits; otherwise one-line UserError."""
    rep = check_state_dict(model, state_dict, source, **allow)
    if not rep.ok:
        for layout, remap in LAYOUTS.items():
            remapped = remap(model, state_dict)
            rep2 = check_state_dict(model, remapped, f"{source} (remapped from the {layout} layout)", **allow)
            if rep2.ok:
                rep, state_dict = rep2, remapped
                break
    if verbose:
        print(rep.summary(), flush=True)
    if not rep.ok:
        raise UserError(rep.error(hint))
    fitting = {k: state_dict[k] for k in rep.loaded}
    result = model.load_state_dict(fitting, strict=False)
    leftover = [k for k in result.missing_keys if k not in rep.allowed]
    if leftover or result.unexpected_keys:  # cannot happen unless a module bends load_state_dict
        raise UserError(f"loading {source} left keys unset: {_first(leftover + result.unexpected_keys)}")
    return rep


def classifier_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the classifier (timm get_classifier(), else the last nn.Linear)."""
    cls = None
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            cls = get()
        except Exception:  # noqa: BLE001
            cls = None
    name = next((n for n, m in model.named_modules() if cls is not None and m is cls), None)
    if name is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        name = linears[-1] if linears else None
    return [] if name is None else [f"{name}.weight", f"{name}.bias"]


def _torchvision_weights(name: str) -> dict[str, torch.Tensor]:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except Exception:  # noqa: BLE001
        raise UserError(f"torchvision has no pretrained weights for {name!r}; set model.pretrained=false "
                        "or model.pretrained=/path/to/state_dict.pt") from None
    filename = os.path.basename(urlparse(weights.url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return read_checkpoint(cached)
    try:
        sd = torch.hub.load_state_dict_from_url(weights.url, progress=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - offline machine
        raise UserError(f"torchvision weights for {name} are not cached at {cached} and cannot be downloaded "
                        f"({type(e).__name__}); copy {weights.url} there or set model.pretrained=/path/to/file.pth"
                        ) from None
    return extract_state_dict(sd, weights.url)


def _timm_weights(name: str) -> dict[str, torch.Tensor]:
    import timm

    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as e:  # noqa: BLE001 - offline machine / no weights
        raise UserError(f"timm weights for {name} are neither in the Hugging Face cache nor downloadable "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                        "set model.pretrained=/path/to/state_dict.pth or run once with internet") from None


def load_pretrained(model: nn.Module, spec, verbose: bool = True) -> KeyReport | None:
    """`model.pretrained`: false (nothing), true (the library's ImageNet weights) or a file path.

    ImageNet weights may differ from the model only in the classifier (another num_classes): those
    keys are left at their initialization and reported as allowed.
    """
    if spec is None or spec is False or (isinstance(spec, str) and spec.lower() in ("", "false", "none")):
        return None
    if spec is True or (isinstance(spec, str) and spec.lower() == "true"):
        ref = getattr(model, "pretrained_ref", None)
        if not ref:
            raise UserError(f"no library weights exist for this backbone ({type(model).__name__}); "
                            "set model.pretrained=false or a file path")
        library, name = ref
        sd = _torchvision_weights(name) if library == "torchvision" else _timm_weights(name)
        source = f"{library}:{name}"
    else:
        sd, source = read_checkpoint(spec), str(spec)
    allow = classifier_keys(model)
    first_conv = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    stem_off = any(k == f"{first_conv}.weight" for k, _, _ in check_state_dict(model, sd, source,
                                                                               allow_mismatch=allow).mismatched)
    hint = "ImageNet weights need the ImageNet stem: set model.cifar_stem=false." if stem_off else ""
    return load_checked(model, sd, source, hint=hint, verbose=verbose, allow_mismatch=allow)
