"""Shared CLI plumbing: one clear line for user errors instead of a traceback wall."""

from __future__ import annotations

import functools
import sys

from dyconv_repro.errors import UserError


def user_errors_exit(fn):
    """Run `fn`; a UserError prints `error: <message>` on stderr and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def split_args(argv: list[str], tool_keys: tuple[str, ...], tool: str, usage: str) -> tuple[dict, list[str]]:
    """(the tool's own `key=value` options, the Hydra overrides for the run's config); `-h/--help` prints the
    usage and the config groups, then exits 0."""
    from dyconv_repro.config import groups_help

    if any(a in ("-h", "--help") for a in argv):
        print(groups_help(tool, usage))
        raise SystemExit(0)
    flags = [a for a in argv if a.startswith("-")]
    if flags:
        raise UserError(f"unexpected option(s) {flags}; {usage}")
    own, overrides = {}, []
    for tok in argv:
        k, eq, v = tok.partition("=")
        if eq and k in tool_keys:
            own[k] = v
        else:
            overrides.append(tok)
    return own, overrides
