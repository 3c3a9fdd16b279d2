"""Runs a training script as ``__main__`` and records when each of its optimizer steps ends.

    DDIFF_STEP_CLOCK=steps.json python -m benchmarks.step_clock SCRIPT [SCRIPT ARGS...]

Any script whose optimizer is a ``torch.optim.Optimizer`` (ddiff's, upstream's) is clocked the same way, without a
change to its code: torch's global optimizer-step hook records ``time.perf_counter()`` after every step, and the
times are written (JSON: ``{"step_ends": [...], "trainable_params": N}``) when the script exits. The time of step k is then the gap between
the ends of steps k-1 and k: the data, the forward, the backward, the optimizer and the loop's own logging, and
nothing of the start-up (imports, loading, caching) that a wall-clock difference would mix in.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def step_times(step_ends: list[float], warmup: int = 1) -> list[float]:
    """Seconds per step from the steps' end times, leaving out the first ``warmup`` steps (the first step's gap
    would reach back to the start-up, and the next ones may still warm caches)."""
    gaps = [b - a for a, b in zip(step_ends, step_ends[1:])]
    return gaps[warmup:]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = os.environ.get("DDIFF_STEP_CLOCK")
    if not argv or not out:
        raise SystemExit("usage: DDIFF_STEP_CLOCK=OUT.json python -m benchmarks.step_clock SCRIPT [ARGS...]")
    script = Path(argv[0])
    if not script.is_file():
        raise SystemExit(f"step_clock: no such script: {script}")
    ends: list = []  # host times, or CUDA events: a step ends when its kernels do, and waiting for them here
    held: dict[str, int] = {}  # would take from the script the overlap of one step's queueing with the last's work

    def hook(optimizer, args, kwargs):
        if not held:  # the script's (first) optimizer, and what it trains
            held["optimizer"] = id(optimizer)
            held["params"] = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        if id(optimizer) != held["optimizer"]:
            return
        if torch.cuda.is_available():
            ends.append(torch.cuda.Event(enable_timing=True))
            ends[-1].record()
        else:
            ends.append(time.perf_counter())

    def write():
        times = ends
        if ends and not isinstance(ends[0], float):
            torch.cuda.synchronize()
            times = [ends[0].elapsed_time(e) / 1e3 for e in ends]
        Path(out).write_text(json.dumps({"script": str(script), "step_ends": times,
                                         "trainable_params": held.get("params", 0)}))

    if os.environ.get("DDIFF_TORCHVISION_SHIM") == "1":  # benchmarks.upstream_pair, where torchvision does not import
        from benchmarks.upstream_shim import install

        install(str(script))
    register_optimizer_step_post_hook(hook)
    atexit.register(write)
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))  # as `python SCRIPT` would
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
