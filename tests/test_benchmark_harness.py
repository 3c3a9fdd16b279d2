"""The benchmark harness itself: what a GPU window's run brings back when its time limit cuts it off."""

import json
import os
import signal
import subprocess
import sys
import textwrap

from .conftest import REPO


def test_a_run_cut_off_mid_variant_still_writes_the_variants_it_measured(tmp_path):
    # gpu_run.sh ends pytest with SIGINT at its time limit; a variant interrupted before its first round ended has no
    # data, and pytest-benchmark would fail on it while writing the JSON, losing every variant measured before. The
    # SIGINT must also be heard where the session was started with it ignored (in the background of a script).
    (tmp_path / "test_cut.py").write_text(textwrap.dedent("""
        import os, signal

        def test_measured(benchmark):
            benchmark.pedantic(lambda: None, rounds=2)

        def test_cut_off(benchmark):
            benchmark.pedantic(lambda: os.kill(os.getpid(), signal.SIGINT), rounds=2)
    """))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.conftest",
                           "test_cut.py", "--benchmark-json", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert "KeyboardInterrupt" in proc.stdout + proc.stderr
    assert [b["name"] for b in json.loads(out.read_text())["benchmarks"]] == ["test_measured"]
