"""FLUX.1-dev's attention alone, forward and backward, on each SDPA backend: its time, its error, and whether it crashes.

    python -m benchmarks.attention_probe [--device cuda] [--output .benchmarks/attention.json]

At 1024 px FLUX.1-dev attends over 4,608 tokens (4,096 image + 512 text) with 24 heads of 128, in each of its 57
blocks, and the flash-attention backward alone was 21% of the eager step's GPU time on an H200 (issue 12). Hopper's
faster kernels come through cuDNN, whose SDPA backward crashed with an illegal memory access at the trainer's second
step (H100 and H200, torch 2.11). This probe times one block's attention on each backend with the tensors laid out as
FLUX lays them out, and tries the layouts that could cause the crash, each case in a process of its own (an illegal
memory access ends the CUDA context): how much of the step attention could give back, and under what condition cuDNN
runs.

Two things vary. The inputs: torch's SDPA as diffusers' default backend calls it (permuted views of (B, S, H, D)
tensors), or contiguous (B, H, S, D) copies as diffusers' ``_native_cudnn`` backend makes them. The gradient that
reaches the attention's output: a double-stream block splits its attention output along the sequence and the split
parts' gradients come back as one contiguous (B, S, H*D) tensor; a single-stream block concatenates its attention
output with its MLP's (3,072 + 12,288 features), so its gradient is a slice whose rows are 15,360 apart. Both reach
SDPA's backward with strides unlike its output's, and in a step both kinds arrive, single blocks first. Whether torch
re-lays such a gradient out before cuDNN's backward depends on its version and cuDNN's (recorded).

Cases ("both": the two gradient layouts in turn, in one process, as a step's backward sends them):
  flash             the flash kernel, permuted views, both.
  efficient         the memory-efficient kernel, permuted views, both.
  cudnn-views-double, cudnn-views-single, cudnn-views-both
                    the cuDNN kernel, permuted views, one gradient layout or both.
  cudnn-diffusers   diffusers' own ``_native_cudnn`` function (contiguous inputs), both.
  cudnn-matched     ddiff's ``ddiff_cudnn`` function: as cudnn-diffusers, with each gradient made contiguous in the
                    output's own layout before cuDNN's backward sees it.
  math              the reference kernel (on a CPU the only one; on a GPU not run above 2,048 tokens: S x S scores).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from ddiff_core.atomic import atomic_write_text
from ddiff_core.speed import layout_matched_attention

REPO = Path(__file__).resolve().parents[1]
# flash (the reference) and cudnn-matched (gpu_run.sh's question) first: a probe cut off by its time limit has them.
CASES = ("flash", "cudnn-matched", "efficient", "cudnn-views-double", "cudnn-views-single", "cudnn-views-both",
         "cudnn-diffusers", "math")
FLUX_BLOCKS = 19 + 38
MLP_RATIO = 4  # a single-stream block's MLP width over its attention's


def _backend(case: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}.get(case, SDPBackend.CUDNN_ATTENTION)


def attention(q, k, v, case: str) -> torch.Tensor:
    """(B, S, H, D) query, key, value -> (B, S, H*D), as FLUX's attention processor computes and flattens it.
    cudnn-diffusers runs diffusers' own ``_native_cudnn`` function, cudnn-matched ddiff's ``ddiff_cudnn`` one."""
    from torch.nn.attention import sdpa_kernel

    if case == "cudnn-diffusers":  # diffusers' own function, not whatever holds its registry slot
        from diffusers.models.attention_dispatch import _native_cudnn_attention

        return _native_cudnn_attention(q, k, v).flatten(2, 3)
    if case == "cudnn-matched":
        return layout_matched_attention(_backend(case))(q, k, v).flatten(2, 3)
    q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    with sdpa_kernel(_backend(case)):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.permute(0, 2, 1, 3).flatten(2, 3)


def gradient_layouts(grad: torch.Tensor, case: str) -> list[torch.Tensor]:
    """The output gradient(s) a case sends, in turn: the same values, laid out as a double-stream block's (contiguous)
    and/or a single-stream block's (a slice of the attention + MLP concatenation)."""
    wide = grad.new_zeros(*grad.shape[:-1], grad.shape[-1] * (1 + MLP_RATIO))
    wide[..., :grad.shape[-1]] = grad
    single = wide[..., :grad.shape[-1]]
    if case.endswith("-double"):
        return [grad]
    if case.endswith("-single"):
        return [single]
    return [single, grad]  # a step's backward meets the single-stream blocks first


def run_case(case: str, device: str, seq: int, heads: int, head_dim: int, iters: int) -> dict:
    """Times ``iters`` forward+backward passes after two warm-up ones; compares with the reference kernel's result."""
    early = run_case_here(case, device, seq)
    if early is not None:
        return early
    dev = torch.device(device)
    dtype = torch.bfloat16
    gen = torch.Generator(dev).manual_seed(0)
    q, k, v = (torch.randn(1, seq, heads, head_dim, device=dev, dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    grads = gradient_layouts(torch.randn(1, seq, heads * head_dim, device=dev, dtype=dtype, generator=gen), case)

    def attend(which: str, grad):
        for x in (q, k, v):
            x.grad = None
        out = attention(q, k, v, which)
        out.backward(grad)
        return out

    reference_case = "flash" if dev.type == "cuda" else "math"
    ref_out = attend(reference_case, grads[-1]).detach().float()
    ref_dq = q.grad.detach().float()
    for i in range(2):
        out = attend(case, grads[i % len(grads)])
    err = {"out": _rel_err(out, ref_out), "dq": _rel_err(q.grad, ref_dq)}
    fwd_ms, bwd_ms = [], []
    for i in range(iters):
        grad = grads[i % len(grads)]
        for x in (q, k, v):
            x.grad = None
        if dev.type == "cuda":
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
            out = attention(q, k, v, case)
            marks[1].record()
            out.backward(grad)
            marks[2].record()
            torch.cuda.synchronize()
            fwd_ms.append(marks[0].elapsed_time(marks[1]))
            bwd_ms.append(marks[1].elapsed_time(marks[2]))
        else:
            t0 = time.perf_counter()
            out = attention(q, k, v, case)
            t1 = time.perf_counter()
            out.backward(grad)
            t2 = time.perf_counter()
            fwd_ms.append((t1 - t0) * 1e3)
            bwd_ms.append((t2 - t1) * 1e3)
    fwd, bwd = sorted(fwd_ms)[len(fwd_ms) // 2], sorted(bwd_ms)[len(bwd_ms) // 2]
    flop = 4 * seq * seq * heads * head_dim  # QK^T and PV in the forward; the backward does 2.5x that
    return {"status": "ok", "fwd_ms": fwd, "bwd_ms": bwd, "fwd_tflops": flop / fwd / 1e9,
            "bwd_tflops": 2.5 * flop / bwd / 1e9, "per_step_ms": FLUX_BLOCKS * (fwd + bwd),
            "rel_err_vs_" + reference_case: err}


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach().float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def probe(device: str, seq: int, heads: int, head_dim: int, iters: int, timeout: float = 20,
          on_case=None) -> dict:
    """Every case in a process of its own; a failure is recorded with its exit status and error line, and the probe
    goes on. ``on_case(results)`` is called after each case (the caller writes what it has so far)."""
    results = {}
    for case in CASES:
        status = run_case_here(case, device, seq)
        if status is None:
            cmd = [sys.executable, "-m", "benchmarks.attention_probe", "--case", case, "--device", device,
                   "--seq", str(seq), "--heads", str(heads), "--head-dim", str(head_dim), "--iters", str(iters)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
                status = _child_result(proc)
            except subprocess.TimeoutExpired:
                status = {"status": f"timed out after {timeout:.0f} s"}
        results[case] = status
        print(f"{case}: {status['status']}", flush=True)
        if on_case is not None:
            on_case(results)
    return results


def run_case_here(case: str, device: str, seq: int) -> dict | None:
    """The status of a case that needs no process (it cannot run on this device), or None."""
    dev = torch.device(device)
    if dev.type != "cuda" and case != "math":
        return {"status": "unavailable: needs CUDA"}
    if dev.type == "cuda" and case == "math" and seq > 2048:
        return {"status": f"not run: {seq} tokens (the math kernel holds the S x S scores)"}
    return None


_ERROR_LINE = re.compile(r"^\S*(Error|Exception)\b.*:")


def _child_result(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = proc.stderr.strip().splitlines()[-15:]
    errors = [line for line in tail if _ERROR_LINE.match(line)]
    reason = (errors or tail or ["no output"])[-1].strip()[:300]
    text = proc.stderr
    if proc.returncode < 0:
        kind = f"killed by signal {-proc.returncode}"
    elif "CUDA error" in text or "illegal memory access" in text or "CUDNN_STATUS" in text:
        kind = f"crashed (exit {proc.returncode})"
    else:
        kind = f"failed (exit {proc.returncode})"
    return {"status": f"{kind}: {reason}", "stderr_tail": tail}


def cudnn_worth_a_trainer_run(result: dict, max_err: float = 2e-2) -> bool:
    """Whether the probe says ddiff's cuDNN backend (``ddiff_cudnn``: the cudnn-matched case) runs, agrees with flash
    and is faster than it, forward and backward together: then gpu_run.sh measures the trainer on it."""
    cases = result.get("cases", {})
    matched, flash = cases.get("cudnn-matched", {}), cases.get("flash", {})
    if matched.get("status") != "ok" or flash.get("status") != "ok":
        return False
    err = list(matched.get("rel_err_vs_flash", {}).values())
    times = [matched["fwd_ms"], matched["bwd_ms"], flash["fwd_ms"], flash["bwd_ms"]]
    if not err or not all(math.isfinite(e) and e <= max_err for e in err) or not all(map(math.isfinite, times)):
        return False  # a NaN error or time passes no comparison
    return matched["fwd_ms"] + matched["bwd_ms"] < flash["fwd_ms"] + flash["bwd_ms"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq", type=int, default=4096 + 512, help="tokens (1024 px FLUX: 4,096 image + 512 text)")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--case", choices=CASES, help="run one case in this process (the probe's child)")
    parser.add_argument("--output", type=Path, help="JSON file for the results")
    parser.add_argument("--worth-trying", type=Path, metavar="RESULT_JSON",
                        help="exit 0 if that probe result says ddiff_cudnn is worth a trainer run, 1 if not")
    args = parser.parse_args(argv)
    if args.worth_trying:
        worth = args.worth_trying.is_file() and cudnn_worth_a_trainer_run(json.loads(args.worth_trying.read_text()))
        print(f"ddiff_cudnn worth a trainer run: {'yes' if worth else 'no'}")
        raise SystemExit(0 if worth else 1)
    if args.case:
        print(json.dumps(run_case(args.case, args.device, args.seq, args.heads, args.head_dim, args.iters)))
        return
    from benchmarks.harness import versions

    result = {"attention_probe": True, "device": args.device, "seq": args.seq, "heads": args.heads,
              "head_dim": args.head_dim, "iters": args.iters, "blocks": FLUX_BLOCKS, **versions(),
              "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
              "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu", "cases": {}}

    def write(cases: dict) -> None:  # after each case: a time limit that cuts the probe off keeps what it measured
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.output, json.dumps({**result, "cases": cases}, indent=1) + "\n")

    result["cases"] = probe(args.device, args.seq, args.heads, args.head_dim, args.iters, on_case=write)
    print(render(result))


def render(result: dict) -> str:
    lines = [f"## FLUX.1-dev's attention alone, by SDPA backend ({result['device_name']})", "",
             f"torch {result.get('torch')}, cuDNN {result.get('cudnn')}. One block's attention: {result['seq']:,} tokens{'' if result['seq'] == 4608 else ' (4,608 at 1024 px)'}, "
             f"{result['heads']} heads of {result['head_dim']}, bf16, forward + backward, as FLUX lays the tensors out; median of "
             f"{result['iters']} after two warm-up passes, each case in its own process. Per step: x {result['blocks']} "
             "blocks. Error: max |difference| / max |reference| (flash on a GPU). TFLOP/s count the backward as 2.5x the "
             "forward (the MFU table counts the whole step's attention as 3x). Command: "
             "`python -m benchmarks.attention_probe`.", "",
             "| case | status | forward | backward | fwd TFLOP/s | bwd TFLOP/s | per step | error (out, dq) |",
             "|---|---|---|---|---|---|---|---|"]
    for case, r in result["cases"].items():
        if r.get("status") != "ok":
            lines.append(f"| {case} | {r.get('status')} | | | | | | |")
            continue
        err = next(v for k, v in r.items() if k.startswith("rel_err"))
        lines.append(f"| {case} | ok | {r['fwd_ms']:.2f} ms | {r['bwd_ms']:.2f} ms | {r['fwd_tflops']:.0f} | "
                     f"{r['bwd_tflops']:.0f} | {r['per_step_ms']:.0f} ms | {err['out']:.1e}, {err['dq']:.1e} |")
    return "\n".join(lines + [""])


if __name__ == "__main__":
    main()
