"""Turns pytest-benchmark JSON files into benchmarks/RESULTS.md.

    python -m benchmarks.report benchmarks/results/*.json --output benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# What each group measures, and the claim it tests (from the efficiency report, or ddiff's own).
CLAIMS = {
    "vae_scaling": "Fix 1 (report: HIGH, 5-10% per step): inline VAE scaling vs one LatentNorm helper, whole training step",
    "validation_reload": "Fix 2: validation pipeline from_pretrained each time vs assembled once from memory (4 images)",
    "serving": "Fix 3: base + one pipeline per LoRA (3 LoRAs) vs one pipeline with named adapters; base->LoRA->base requests",
    "lora_switch": "Fix 3: one switch from one LoRA to another: pick the other pipeline vs set_adapters",
    "lora_list": "Fix 5: LoRA list scanned on each of 3 calls vs cached catalog",
    "validation_batching": "Fix 6: 4 validation images one call each vs one batched call",
    "feature_caches": "Latent + text-embedding caches off vs on, whole training step",
    "gradient_checkpointing": "Gradient checkpointing off vs on, whole training step",
    "mixed_precision": "Frozen weights fp32 vs bf16 (LoRA fp32), whole training step",
    "compile": "Denoiser eager vs --compile (regional torch.compile), whole cached training step",
    "lora_input_casts": "bf16 base, fp32 LoRA under autocast: peft's round-trip cast of each LoRA input kept vs skipped, whole cached step",
    "dataloader": "DataLoader: 0 workers vs 2 persistent prefetching workers, one epoch of decoded images",
    "ddp_no_sync": "4-step gradient accumulation, 2-process DDP: all-reduce every micro-batch vs no_sync",
}


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def _fmt_mem(mb) -> str:
    return "n/a" if mb is None else f"{mb:,.0f} MiB"


def _seconds(entry: dict) -> float:
    return entry["extra_info"].get("inner_median_s", entry["stats"]["median"])


def _spread(pairs: list[tuple[dict, dict]]) -> tuple[float, float, float, str]:
    """(ratio, low, high, how) for before/after pairs of pytest-benchmark entries, one pair per session.

    Several sessions: the median of their ratios, and the lowest and highest. One session: its ratio, and the band
    its rounds allow (before's quartiles over after's, crosswise); a single measurement has no spread (low = high).
    """
    ratios = sorted(_seconds(b) / _seconds(a) for b, a in pairs)
    if len(ratios) > 1:  # the middle session's ratio (the lower middle for an even count), so the times shown agree
        return ratios[(len(ratios) - 1) // 2], ratios[0], ratios[-1], f"{len(ratios)} sessions"
    b, a = pairs[0]
    if "inner_median_s" in b["extra_info"] or min(b["stats"]["rounds"], a["stats"]["rounds"]) < 4:
        return ratios[0], ratios[0], ratios[0], "one measurement"
    return ratios[0], b["stats"]["q1"] / a["stats"]["q3"], b["stats"]["q3"] / a["stats"]["q1"], "quartiles of the rounds"


def _verdict(case: str, ratio: float, low: float, high: float, how: str, mem_before, mem_after, growth_before,
             growth_after) -> str:
    """One line, from the numbers alone: what got faster, leaner, or neither; noise is the measured spread."""
    parts = []
    if low == high:
        parts.append(f"ratio {ratio:.2f} from one measurement: no spread to judge noise by")
    elif low > 1.0:
        parts.append(f"after is {ratio:.2f}x faster")
    elif high < 1.0:
        parts.append(f"after is {1 / ratio:.2f}x slower")
    else:
        parts.append(f"no time difference beyond noise ({(ratio - 1) * 100:+.1f}%)")
    if low != high:
        parts[-1] += f" (ratio {low:.2f}-{high:.2f} over {how})"
    if mem_before and mem_after:
        saved = mem_before - mem_after
        if abs(saved) / mem_before >= 0.05:
            parts.append(f"{'saves' if saved > 0 else 'costs'} {abs(saved):,.0f} MiB peak")
        else:
            parts.append("same peak memory")
    if growth_before is not None and growth_after is not None and max(growth_before, growth_after) >= 5:
        parts.append(f"RSS growth from call 1 to call 5: {growth_before:,.0f} MiB before, {growth_after:,.0f} MiB after")
    if case == "vae_scaling" and high < 1.05:
        parts.append("the report's 5-10% claim does not hold")
    return "; ".join(parts)


def _load(paths: list[Path]) -> list[dict]:
    """Every benchmark entry, each tagged with the file (session) it came from."""
    benches = []
    for path in paths:
        benches += [{**b, "source": str(path)} for b in json.loads(path.read_text()).get("benchmarks", [])]
    return benches


def render(paths: list[Path]) -> str:
    benches = _load(paths)
    by_key: dict[tuple, dict[str, dict]] = {}  # session file -> entry, for each (model, device, case, variant)
    for b in benches:
        e = b["extra_info"]
        if e["case"] not in CLAIMS:
            continue  # a case since removed from the suite
        key = (f'{e.get("family", "flux")} {e.get("size", "full")}', e.get("device"), e["case"], e["variant"])
        by_key.setdefault(key, {})[b["source"]] = b
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks.report` from pytest-benchmark JSON (see the README's Benchmarks "
             "section for the commands). Times are medians after warm-up rounds. Peak memory: on CPU, the peak RSS "
             "of a fresh process that builds and runs only that variant (so one variant's allocations never count "
             "against another); on CUDA, `torch.cuda.max_memory_allocated` after a reset. Ratio = before / after "
             "median time (> 1: after is faster). A verdict says faster or slower only when the whole measured spread "
             "of the ratio is on one side of 1: the range of per-session ratios when the suite ran several times, "
             "else the band the rounds' quartiles allow.", ""]
    groups = sorted({(k[0], k[1], k[2]) for k in by_key if k[3] in ("before", "after")},
                    key=lambda k: (k[0], k[1], list(CLAIMS).index(k[2]) if k[2] in CLAIMS else 99))
    for size, device in sorted({(g[0], g[1]) for g in groups}):
        sample = next(b for k, bs in by_key.items() if k[0] == size and k[1] == device for b in bs.values())["extra_info"]
        cpu = f"CPU {sample['cpu']} ({sample.get('cpu_isa', 'unknown')}); " if "cpu" in sample else ""
        lines += [f"## {size} model on {device} ({sample.get('device_name')})", "",
                  f"torch {sample['torch']}, diffusers {sample['diffusers']}, transformers {sample['transformers']}, "
                  f"peft {sample['peft']}, accelerate {sample['accelerate']}, Python {sample['python']}; "
                  f"{cpu}{sample['machine']}; weights {sample['dtype']}.", "",
                  "| fix | before | after | ratio | peak mem before | peak mem after | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for g in [g for g in groups if g[:2] == (size, device)]:
            bs, as_ = by_key.get(g + ("before",), {}), by_key.get(g + ("after",), {})
            pairs = [(bs[source], as_[source]) for source in sorted(bs.keys() & as_.keys())]
            if not pairs:
                continue
            ratio, low, high, how = _spread(pairs)
            # The times shown are those of the session whose ratio is the median, so the columns agree.
            middle = sorted(pairs, key=lambda p: _seconds(p[0]) / _seconds(p[1]))[(len(pairs) - 1) // 2]
            eb, ea = middle[0]["extra_info"], middle[1]["extra_info"]
            tb, ta = _seconds(middle[0]), _seconds(middle[1])
            verdict = _verdict(g[2], ratio, low, high, how, eb.get("peak_mem_mb"), ea.get("peak_mem_mb"),
                               eb.get("rss_growth_mb"), ea.get("rss_growth_mb"))
            lines.append(f"| {CLAIMS.get(g[2], g[2])} | {_fmt_time(tb)} | {_fmt_time(ta)} | {ratio:.2f} | "
                         f"{_fmt_mem(eb.get('peak_mem_mb'))} | {_fmt_mem(ea.get('peak_mem_mb'))} | {verdict} |")
        lines.append("")
    steps = [b for b in benches if b["extra_info"]["case"] == "bucket_step"]
    if steps:  # one table for the first model and device measured; each bucket against the square of its session
        e0 = steps[0]["extra_info"]
        steps = [b for b in steps if all(b["extra_info"].get(k) == e0.get(k) for k in ("family", "size", "device"))]
        sessions = sorted({b["source"] for b in steps})
        lines += [f"## Step time per aspect-ratio bucket ({e0.get('family', 'flux')} {e0['size']} on {e0['device']})", "",
                  "One cached training step (batch 2) with every image in the bucket; the buckets have about equal "
                  f"area, so their steps should cost about the same. Over {len(sessions)} session(s): the median step, "
                  "and the step against the square bucket of the same session (median, lowest-highest).", "",
                  "| bucket (HxW) | width:height | pixels | median step | vs the square |", "|---|---|---|---|---|"]

        def frame(bucket: str) -> tuple[int, int]:
            height, width = map(int, bucket.split("x"))
            return height, width

        by_bucket: dict[str, dict[str, float]] = {}
        for b in steps:
            by_bucket.setdefault(b["extra_info"]["bucket"], {})[b["source"]] = b["stats"]["median"]
        squares = [k for k in by_bucket if frame(k)[0] == frame(k)[1]]
        for bucket in sorted(by_bucket, key=lambda k: frame(k)[1] / frame(k)[0]):
            times = by_bucket[bucket]
            ratios = [times[src] / by_bucket[squares[0]][src] for src in times if squares and src in by_bucket[squares[0]]]
            spread = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "n/a"
            height, width = frame(bucket)
            lines.append(f"| {bucket} | {width / height:.2f} | {height * width:,} | "
                         f"{_fmt_time(statistics.median(times.values()))} | {spread} |")
        lines.append("")
    for path in paths:  # benchmarks.multi_run's results
        result = json.loads(path.read_text())
        if "one_launch" in result:
            from benchmarks.multi_run import render as render_multi_run

            lines += [render_multi_run(result)]
        if result.get("attention_probe"):
            from benchmarks.attention_probe import render as render_attention_probe

            lines += [render_attention_probe(result)]
        if result.get("upstream_pair"):
            from benchmarks.upstream_pair import render as render_upstream_pair

            lines += [render_upstream_pair(result)]
        if "bitwise_equal" in result:
            from benchmarks.lora_casts import render as render_lora_casts

            lines += [render_lora_casts(result)]
    quantized = [b for b in benches if b["extra_info"]["case"] == "quantized_base"]
    if quantized:
        e0 = quantized[0]["extra_info"]
        base = next((b["stats"]["median"] for b in quantized if b["extra_info"]["quantization"] == "none"
                     and not b["extra_info"]["eight_bit_adam"]), None)
        lines += [f"## A quantized frozen base: FLUX.1-dev's transformer shape, {e0['resolution']} px, batch 1, "
                  "gradient checkpointing on", "",
                  f"{e0.get('device_name')}; torch {e0['torch']}, diffusers {e0['diffusers']}. The trainer's step "
                  "(rank-16 LoRA in fp32 on all blocks, cached latents and 512 text tokens). Peak: "
                  "`torch.cuda.max_memory_allocated` over two steps, weights included; estimate: ddiff's own, printed "
                  "before a run's first step. Goal: at most 24 GiB with int8 or fp8, at most 16 GiB with NF4 and "
                  "8-bit Adam. Command: `bash benchmarks/gpu_memory.sh`.", "",
                  "| frozen weights | optimizer | peak memory | estimate | s/step (median) | time vs bf16 |",
                  "|---|---|---|---|---|---|"]
        for b in quantized:
            e = b["extra_info"]
            peak = f"{e['peak_mem_mb'] / 1024:.1f} GiB" if e.get("peak_mem_mb") else "n/a"
            if e.get("held_before_mb", 0) > 256:  # an earlier variant's memory was still allocated: the peak counts it
                peak += f" ({e['held_before_mb'] / 1024:.1f} GiB held before)"
            ratio = f"{b['stats']['median'] / base:.2f}x" if base else "n/a"
            lines.append(f"| {'bf16' if e['quantization'] == 'none' else e['quantization']} | "
                         f"{'AdamW 8-bit' if e['eight_bit_adam'] else 'AdamW'} | {peak} | "
                         f"{e['estimate_mb'] / 1024:.1f} GiB | {b['stats']['median']:.3f} | {ratio} |")
        lines.append("")
    trainer = [b for b in benches if b["extra_info"]["case"] == "full_flux_trainer"]
    if trainer:
        e0 = trainer[0]["extra_info"]
        lines += ["## The trainer's step at FLUX.1-dev's transformer shape (random bf16 weights built on the GPU)", "",
                  f"{e0.get('device_name')}; torch {e0['torch']}, diffusers {e0['diffusers']}. Built by ddiff's builders "
                  "and run as the trainer runs it (rank-16 LoRA on all blocks in fp32 under bf16 autocast, cached "
                  "latents and 512 text tokens, clip, AdamW, LR schedule). MFU = model FLOPs per step / median step "
                  "time / 989 TFLOP/s (dense bf16). Graphs: torch.compile graphs compiled for that variant. peft casts: "
                  "\"kept\" is peft's default round trip of each LoRA input through fp32 (the before of "
                  "`skip_lora_input_casts`). Attention: the `--attention_backend` (native: torch's SDPA, flash on "
                  "CUDA). Host syncs: the times one step made the host wait for the GPU (torch's sync debug mode). "
                  "First step: the variant's first step, compile included (cold for the first compiled variant on a "
                  "machine; later ones, in the same or a later process, may reuse inductor's on-disk cache, or the "
                  "graphs of an earlier variant: 0 graphs). Command: `bash benchmarks/gpu_run.sh`.", "",
                  "| resolution | batch | compile | gradient checkpointing | peft casts | attention | s/step (median) | "
                  "peak memory | TFLOP/step | MFU | graphs | host syncs | first step |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for b in trainer:
            e = b["extra_info"]
            interval = e["checkpointing_interval"]
            ckpt = "off" if not interval else ("every block" if interval == 1 else f"1 block in {interval}")
            mem = f"{e['peak_mem_mb'] / 1024:.1f} GiB" if e.get("peak_mem_mb") else "n/a"
            casts = {True: "kept", False: "skipped"}.get(e.get("peft_input_casts"), "n/a")
            attention = e.get("attention_backend", "native")
            lines.append(f"| {e['resolution']} px | {e['batch']} | {'on' if e['compile'] else 'off'} | {ckpt} | "
                         f"{casts} | {attention} | {b['stats']['median']:.3f} | {mem} | "
                         f"{e.get('step_tflop', float('nan')):.1f} | "
                         f"{e.get('mfu', float('nan')) * 100:.1f}% | {e.get('graphs', 'n/a')} | "
                         f"{e.get('host_syncs', 'n/a')} | {_fmt_seconds(e.get('first_step_s'))} |")
        lines.append("")
        for b in trainer:
            if b["extra_info"].get("kernels"):
                lines += render_kernels(b)
    full = [b for b in benches if b["extra_info"]["case"].startswith("full_flux_")
            and b["extra_info"]["case"] != "full_flux_trainer"]
    if full:
        e0 = full[0]["extra_info"]
        lines += ["## Full FLUX.1-dev transformer shape, an earlier hand-made step (11.9B parameters, random bf16 weights)", "",
                  f"{e0.get('device_name')}; torch {e0['torch']}, diffusers {e0['diffusers']}. One LoRA step (rank 16, "
                  "all blocks), batch 1, cached latents and text embeddings (512 text tokens). MFU = model FLOPs per "
                  "step (2x linear forward + 3x attention forward) / median step time / 989 TFLOP/s (dense bf16).", "",
                  "| resolution | gradient checkpointing | s/step (median) | peak memory | TFLOP/step | MFU |",
                  "|---|---|---|---|---|---|"]
        for b in sorted(full, key=lambda b: (b["extra_info"]["resolution"], b["extra_info"]["variant"])):
            e = b["extra_info"]
            lines.append(f"| {e['resolution']} px | {'on' if e['variant'] == 'grad-ckpt' else 'off'} | "
                         f"{b['stats']['median']:.3f} | {e['peak_mem_mb'] / 1024:.1f} GiB | {e['step_tflop']:.1f} | "
                         f"{e['mfu'] * 100:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def _fmt_seconds(value) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def render_kernels(bench: dict) -> list[str]:
    """Where one step's GPU time goes, by kernel category (``benchmarks.harness.kernel_table``)."""
    e = bench["extra_info"]
    gpu_ms = sum(row["ms"] for row in e["kernels"])
    lines = [f"### Where the GPU time of one step goes: {e['variant']}", "",
             f"torch.profiler over two steps after the timing; kernel time {gpu_ms:.0f} ms per step against "
             f"{bench['stats']['median'] * 1000:.0f} ms of wall time (the rest: the GPU waiting for the host).", "",
             "| kernels | GPU ms/step | share | launches/step | largest kernel |", "|---|---|---|---|---|"]
    for row in e["kernels"]:
        top = row["top"].replace("|", "/")
        lines.append(f"| {row['category']} | {row['ms']:.1f} | {row['share'] * 100:.0f}% | {row['launches']} | "
                     f"`{top}` |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--notes", type=Path, default=Path(__file__).with_name("NOTES.md"),
                        help="hand-written findings appended after the tables")
    args = parser.parse_args()
    text = render(args.inputs)
    if args.notes.is_file():
        text += "\n" + args.notes.read_text()
    args.output.write_text(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
