"""Measuring one variant: warm-up, GPU sync inside the timed function, medians; peak memory isolated per variant."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import torch

from benchmarks.cases import CASES, REPO, Env, sync


def cpu_description() -> tuple[str, str]:
    """The CPU's model name and the vector instruction sets that decide CPU matmul speed (bf16 above all)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):  # x86, Arm
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "bf16", "sve")
    return model, " ".join(f for f in wanted if f in flags) or "unknown"


def versions() -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers

    cpu, isa = cpu_description()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "device_name": device,
            "cpu": cpu, "cpu_isa": isa}


def peak_memory(env: Env, case: str, variant: str, fn, timing: bool) -> dict:
    """CUDA: max_memory_allocated after a reset, in this process. CPU: a fresh process builds and runs only this
    variant and reports its peak RSS (ru_maxrss) and how much RSS grew between its first and last call."""
    if torch.device(env.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(env.device)
        return {"peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20, "memory_method": "cuda max_memory_allocated"}
    cmd = [sys.executable, "-m", "benchmarks.cases", case, variant, "--size", env.size, "--device", env.device,
           "--dtype", env.dtype, "--family", env.family, "--repeat", "5" if timing else "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {case}/{variant} failed:\n{result.stderr[-3000:]}")
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    return {"peak_mem_mb": probe["peak_rss_mb"], "rss_growth_mb": probe["rss_growth_mb"],
            "rss_before_mb": probe["rss_before_mb"], "rss_after_mb": probe["rss_after_mb"],
            "memory_method": "peak RSS of a fresh process"}


def run_case(benchmark, env: Env, case: str, variant: str, *, rounds: int, timing: bool) -> None:
    """Times ``CASES[case](env, variant)`` with pytest-benchmark and records its memory in extra_info."""
    fn = CASES[case](env, variant)
    result = {}

    def timed():
        result["value"] = fn()
        sync(env.device)

    benchmark.group = case
    benchmark.extra_info.update(case=case, variant=variant, size=env.size, device=env.device, dtype=env.dtype,
                                family=env.family,
                                **versions())
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2 if timing else 0, iterations=1)
    if isinstance(result.get("value"), dict) and "median_step_s" in result["value"]:
        benchmark.extra_info["inner_median_s"] = result["value"]["median_step_s"]
    # Two processes: memory per variant is not one process's peak. With timing off (CI's smoke run) one case
    # still goes through the fresh-process probe, so that path cannot rot either.
    if case != "ddp_no_sync" and (timing or case == "feature_caches"):
        benchmark.extra_info.update(peak_memory(env, case, variant, fn, timing))
