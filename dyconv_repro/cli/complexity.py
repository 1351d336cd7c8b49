"""`dyconv-complexity`: parameters and MAdds (batch 1) of a config, an experiment, or a paper's rows.

    dyconv-complexity model=mobilenet_v2 op=dynamicconv          # any composed config
    dyconv-complexity experiment=dynamicconv/t1_mbv2_w0.5_dy --layers
    dyconv-complexity --paper dynamicconv                         # every row next to the paper

MAdds = FLOPs/2 of torch.utils.flop_counter.FlopCounterMode at batch 1 (convs, matmuls incl. routing
and kernel aggregation; elementwise ops and pooling are free). "deploy" = after re-parameterization.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from dyconv_repro.cli.common import user_errors_exit
from dyconv_repro.config_dir import config_dir
from dyconv_repro.errors import UserError

CONVENTION = ("MAdds = FLOPs/2 at batch 1 (FlopCounterMode: convs + matmuls incl. routing and kernel "
              "aggregation; elementwise ops and pooling free); M = millions")


def compose(overrides: list[str]):
    """The composed train config for Hydra-style overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=config_dir(), version_base=None):
            return hydra_compose(config_name="train", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"cannot compose the config from {overrides}: {str(e).splitlines()[0]}") from None


def measure(cfg, layers: bool = False) -> dict:
    """Build the model of `cfg` and count it; prints the layer table when asked."""
    from dyconv_repro.analysis.complexity import complexity_report
    from dyconv_repro.models.build import build_model_with_report
    from dyconv_repro.models.surgery import print_layer_table

    model, reports = build_model_with_report(cfg, verbose=False)
    if layers:
        print_layer_table(reports)
    return complexity_report(model, int(cfg.data.image_size))


def _m(x) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def _delta(ours, paper) -> str:
    if ours is None or paper in (None, 0):
        return "-"
    return f"{100.0 * (ours / 1e6 - paper) / paper:+.1f}%"


def expected_rows(paper: str) -> list[dict] | None:
    """Rows of results/expected/<paper>.yaml (None when the file is absent, e.g. in an installed wheel)."""
    path = Path(config_dir()).parent / "results" / "expected" / f"{paper}.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    rows = data.get("rows", []) if isinstance(data, dict) else data
    return [r for r in rows if isinstance(r, dict) and r.get("id")]


def _status(ours, paper, tol_pct) -> str:
    if ours is None or paper in (None, 0):
        return ""
    return "ok" if abs(ours / 1e6 - paper) / paper * 100 <= tol_pct else "off"


def run_paper(paper: str, image_size: int | None, extra: list[str]) -> int:
    rows = expected_rows(paper)
    if rows is None:
        print(f"no results/expected/{paper}.yaml in this checkout; nothing to compare", file=sys.stderr)
        return 0
    print(f"# {paper}: {CONVENTION}")
    head = (f"{'experiment':<44} {'params':>7} {'paper':>6} {'delta':>7}  {'MAdds':>8} {'paper':>7} {'delta':>7}"
            f"  {'dep.params':>10} {'dep.MAdds':>9}  status")
    print(head)
    print("-" * len(head))
    for row in rows:
        overrides = [f"experiment={row['id']}"] + ([f"data.image_size={image_size}"] if image_size else []) + extra
        try:
            r = measure(compose(overrides))
        except (UserError, Exception) as e:  # noqa: BLE001 - one bad row must not hide the others
            print(f"{row['id']:<44} error: {str(e).splitlines()[0][:150] if str(e) else type(e).__name__}")
            continue
        tol = row.get("tolerance") or {}
        status = " ".join(s for s in (
            ("params " + _status(r["params"], row.get("params_m"), tol.get("params_pct", 2))).strip(),
            ("madds " + _status(r["madds"], row.get("madds_m"), tol.get("madds_pct", 3))).strip()) if " " in s)
        print(f"{row['id']:<44} {_m(r['params']):>7} {row.get('params_m') or '-':>6} "
              f"{_delta(r['params'], row.get('params_m')):>7}  {_m(r['madds']):>8} {row.get('madds_m') or '-':>7} "
              f"{_delta(r['madds'], row.get('madds_m')):>7}  {_m(r['deploy_params']):>10} "
              f"{_m(r['deploy_madds']):>9}  {status}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dyconv-complexity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=mobilenet_v2 op=dynamicconv")
    p.add_argument("--paper", default=None, help="count every row of results/expected/<paper>.yaml")
    p.add_argument("--layers", action="store_true", help="print the per-layer surgery table")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: data.image_size)")
    return p


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.paper:
        raise SystemExit(run_paper(args.paper, args.image_size, args.overrides))
    overrides = list(args.overrides) + ([f"data.image_size={args.image_size}"] if args.image_size else [])
    cfg = compose(overrides)
    r = measure(cfg, layers=args.layers)
    print(f"# {CONVENTION}")
    from dyconv_repro.models.policy import load_policy

    policy = load_policy(cfg.policy, cfg.op.name).name
    print(f"model={cfg.model.name} op={cfg.op.name} policy={policy} image_size={cfg.data.image_size}")
    print(f"params {_m(r['params'])}M  MAdds {_m(r['madds'])}M  |  deploy: params {_m(r['deploy_params'])}M  "
          f"MAdds {_m(r['deploy_madds'])}M")


if __name__ == "__main__":
    main()
