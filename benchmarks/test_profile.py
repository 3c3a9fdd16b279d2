"""The profile command runs the real training loop and writes a trace TensorBoard and Perfetto open; the LoRA
casts benchmark runs and finds the same bits with fewer casts."""

import gzip
import json
import subprocess
import sys

from benchmarks.cases import REPO


def test_profile_command_writes_a_trace(tmp_path, bench_env):
    size = "tiny" if bench_env.size == "full" else bench_env.size
    result = subprocess.run([sys.executable, "-m", "benchmarks.profile_training", "--size", size, "--steps", "1",
                             "--trace_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Self CPU time total" in result.stdout  # the key_averages table
    traces = list(tmp_path.glob("rank0.*.pt.trace.json.gz"))
    assert len(traces) == 1
    events = json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]
    assert any(e.get("name") == "ProfilerStep#2" for e in events)  # wait 1, warm-up 1, then the recorded step


def test_lora_casts_benchmark_counts_fewer_casts_for_the_same_bits(tmp_path, bench_env):
    from benchmarks.lora_casts import main

    size = "tiny" if bench_env.size == "full" else bench_env.size
    main(["--size", size, "--pairs", "2", "--saved_bytes_resolution", "64", "--output", str(tmp_path / "casts.json")])
    result = json.loads((tmp_path / "casts.json").read_text())
    assert result["bitwise_equal"]
    assert result["skipped"]["casts"] < result["kept"]["casts"] and result["skipped"]["cast_mb"] < result["kept"]["cast_mb"]
    saved = result["saved_bytes"]  # q, k and v read one input: saved once, not as a copy each
    assert all(saved["skipped"][block] < saved["kept"][block] for block in ("double", "single"))
