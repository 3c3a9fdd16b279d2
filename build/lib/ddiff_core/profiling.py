"""Profiler schedule and trace writer, memory readings, and a no-op profiler for runs that do not profile."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch


class NullProfiler:
    """Same methods as a torch profiler, doing nothing, so the loop never asks whether it is profiled."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def step(self) -> None:
        pass


def step_profiler(trace_dir: str | Path, *, wait: int = 1, warmup: int = 1, active: int = 3, rank: int = 0):
    """A torch profiler over ``wait + warmup + active`` optimizer steps, writing TensorBoard/Perfetto traces.

    Call ``.step()`` once per optimizer step. Never time anything under it.
    """
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(
        activities=activities,
        schedule=schedule(wait=wait, warmup=max(1, warmup), active=active, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(trace_dir), worker_name=f"rank{rank}", use_gzip=True),
        record_shapes=True,
        profile_memory=True,
        with_stack=False,
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    On Linux, VmHWM from /proc: it starts afresh at exec. ``ru_maxrss`` does not: it keeps the peak of the process
    that forked this one, so a small process started from a large one would report the large one's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak allocated GPU memory on CUDA, else the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()
