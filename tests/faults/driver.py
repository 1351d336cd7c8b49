"""`python -m tests.faults.driver <dyconv-train args>`: dyconv-train with one fault injected, chosen by the
environment variable FAULT=<kind>:<writer>:<n> (the n-th call of that writer, counted from 1):

  kill:<writer>:<n>    write half of the file, then SIGKILL this process (a kill inside the write)
  enospc:<writer>:<n>  raise OSError(ENOSPC) from that call (a full disk); later calls succeed
  nan:loss:<n>         the loss of training step n (from 1) is NaN (divergence)

writers: ckpt (torch.save of last.pt/best.pt), summary/text (atomic text writes: summary.json, error.txt),
metrics (metrics.jsonl appends).
"""

from __future__ import annotations

import errno
import os
import signal
import sys


def _nth(n: int):
    count = {"calls": 0}

    def hit() -> bool:
        count["calls"] += 1
        return count["calls"] == n

    return hit


def install(fault: str) -> None:
    import torch

    from dyconv_repro.engine import loggers, rundir, trainer

    kind, writer, n = fault.split(":")
    hit = _nth(int(n))

    def fail(path, half: bytes = b"\x00" * 100):
        if kind == "kill":
            with open(path, "wb") as f:
                f.write(half)
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if writer == "ckpt":
        real_save = torch.save

        def save(obj, f, *a, **k):
            if hit():
                fail(getattr(f, "name", f))
            return real_save(obj, f, *a, **k)

        torch.save = save  # this process only; save_atomic is the trainer's one caller
    elif writer in ("summary", "text"):
        real = rundir.write_text_atomic

        def write_text_atomic(path, text):
            if hit():
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                if kind == "kill":
                    tmp.write_text(text[: len(text) // 2])
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            return real(path, text)

        rundir.write_text_atomic = write_text_atomic
        trainer.write_text_atomic = write_text_atomic
    elif writer == "metrics":
        real = loggers.append_jsonl

        def append_jsonl(path, obj):
            if hit():
                fail(path) if kind != "kill" else os.kill(os.getpid(), signal.SIGKILL)
            return real(path, obj)

        loggers.append_jsonl = append_jsonl
    elif kind == "nan":
        from dyconv_repro.engine.hooks import Hook
        from dyconv_repro.pipeline import train as pipeline_train

        real_hooks = pipeline_train.build_hooks

        class NanAt(Hook):
            def extra_losses(self, t):
                return {"nan": torch.tensor(float("nan"))} if t.global_step + 1 == int(n) else {}

        pipeline_train.build_hooks = lambda recipe: real_hooks(recipe) + [NanAt()]
    else:
        raise SystemExit(f"unknown FAULT {fault}")


if __name__ == "__main__":
    if os.environ.get("FAULT"):
        install(os.environ["FAULT"])
    from dyconv_repro.cli.train import main

    sys.argv = ["dyconv-train", *sys.argv[1:]]
    main()
