"""Benchmark options: --device, --dtype, --model-size (tiny | small | full)."""

import os
import signal

import pytest

from benchmarks.cases import Env

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# gpu_run.sh ends a session at its time limit with SIGINT; a process started in the background of a non-interactive
# shell inherits SIGINT ignored, and the session would then run on to the SIGKILL and write no JSON at all.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="cpu or cuda")
    parser.addoption("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights dtype of the measured models")
    parser.addoption("--family", default="flux", help="model family of the tiny/small benchmarks")
    parser.addoption("--model-size", default="small", choices=["tiny", "small", "full"],
                     help="tiny/small: random FLUX built locally; full: FLUX.1-dev's transformer shape on a GPU")


@pytest.fixture(scope="session")
def bench_env(request) -> Env:
    size = request.config.getoption("--model-size")
    return Env(size, request.config.getoption("--device"), request.config.getoption("--dtype"),
               request.config.getoption("--family"))


@pytest.fixture(scope="session")
def timing_enabled(request) -> bool:
    return not request.config.getoption("benchmark_disable", default=False)


@pytest.hookimpl(wrapper=True)
def pytest_benchmark_generate_json(config, benchmarks, include_data, machine_info, commit_info):
    # A variant cut off by a run's time limit (SIGINT) before its first round ended has no data; pytest-benchmark
    # would fail on it while writing the JSON and lose every variant measured before. It is left out instead.
    for bench in benchmarks:
        if not bench:
            bench.fixture.has_error = True
    return (yield)
