"""Measuring one variant: warm-up, GPU sync inside the timed function, medians; peak memory isolated per variant."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import warnings

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


# What a GPU kernel's name says it does, first match wins (names as CUDA, cuBLAS, FlashAttention and inductor give them;
# inductor's fused kernels first, whatever ops their names list).
KERNEL_CATEGORIES = [
    ("compiled (triton)", ("triton_",)),
    ("communication", ("nccl",)),
    ("attention backward", ("flash_bwd", "fmha_bwd", "fmha_cutlassb", "attention_backward", "_bwd_", "bprop")),
    ("attention forward", ("flash_fwd", "fmha", "flash", "attention")),
    ("GEMM", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "cublas", "matmul", "splitk")),
    ("optimizer", ("multi_tensor_apply", "adam", "koptimizer")),
    ("random numbers", ("normal_kernel", "uniform_kernel", "philox", "curand")),
    ("copies and casts", ("copy",)),
    ("norms and reductions", ("reduce", "norm", "softmax")),
    ("other elementwise", ("elementwise", "vectorized", "unrolled")),
]


def kernel_category(name: str) -> str:
    lowered = name.lower()
    return next((category for category, marks in KERNEL_CATEGORIES if any(m in lowered for m in marks)), "other")


def kernel_table(kernels: list[tuple[str, float, int]], steps: int = 1) -> list[dict]:
    """GPU time per step by kernel category, largest first, from (kernel name, total microseconds, launches)."""
    total = sum(us for _, us, _ in kernels) or 1.0
    rows: dict[str, dict] = {}
    for name, us, count in kernels:
        category = kernel_category(name)
        row = rows.setdefault(category, {"category": category, "us": 0.0, "count": 0, "top": ("", -1.0)})
        row["us"] += us
        row["count"] += count
        if us > row["top"][1]:
            row["top"] = (name, us)
    return [{"category": row["category"], "ms": row["us"] / 1000 / steps, "share": row["us"] / total,
             "launches": round(row["count"] / steps), "top": row["top"][0][:90]}
            for row in sorted(rows.values(), key=lambda r: -r["us"])]


def profile_kernels(step, steps: int = 2) -> list[dict]:
    """The kernel table of ``steps`` calls of ``step`` under torch.profiler (CUDA kernels only; for the report, never
    for timing: the profiler slows the host)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
    except RuntimeError as err:  # CUPTI missing or refused: the variant's timing stands without its table
        warnings.warn(f"no kernel table: {err}")
        return []
    kernels = []
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            us = getattr(event, "self_device_time_total", None)
            kernels.append((event.key, us if us is not None else event.self_cuda_time_total, event.count))
    return kernel_table(kernels, steps)
