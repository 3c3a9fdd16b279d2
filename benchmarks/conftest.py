"""Benchmark options: --device, --dtype, --model-size (tiny | small | full)."""

import os
import signal
from pathlib import Path

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
    parser.addoption("--attention-backend", default=None,
                     help="attention of the trainer-step benchmarks, as the trainer's --attention_backend")


@pytest.fixture(scope="session")
def bench_env(request) -> Env:
    size = request.config.getoption("--model-size")
    return Env(size, request.config.getoption("--device"), request.config.getoption("--dtype"),
               request.config.getoption("--family"), request.config.getoption("--attention-backend"))


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


def _json_path(config) -> Path | None:
    target = config.getoption("benchmark_json", default=None) if config is not None else None
    if target is None:
        return None
    if not isinstance(target, (str, os.PathLike)):  # older pytest-benchmark releases hand over an open file
        target = target.name
    return Path(target)


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


@pytest.hookimpl(trylast=True)
def pytest_runtest_logfinish(nodeid, location):
    """After each test, every variant measured so far, at the ``--benchmark-json`` path + ``.partial`` (atomically).
    pytest-benchmark writes its JSON only when the session ends; a run killed at its time limit (a SIGKILL, or a
    SIGINT heard too late, inside a compile) would bring back nothing. The H200 window of 2026-11-27 lost the JSON
    of ten measured variants that way. A session that ends normally removes the partial file."""
    config = _CONFIG.get("config")
    path = _json_path(config)
    if path is None:
        return
    session = config._benchmarksession
    measured = [bench for bench in session.benchmarks if bench]
    if not measured:
        return
    from pytest_benchmark.utils import safe_dumps

    if "machine_info" not in _CONFIG:
        _CONFIG["machine_info"] = session.get_machine_info()
        _CONFIG["commit_info"] = config.hook.pytest_benchmark_generate_commit_info(config=config)
    output = config.hook.pytest_benchmark_generate_json(config=config, benchmarks=measured, include_data=True,
                                                         machine_info=_CONFIG["machine_info"],
                                                         commit_info=_CONFIG["commit_info"])
    partial = partial_path(path)
    tmp = partial.with_name(partial.name + ".tmp")
    tmp.write_text(safe_dumps(output, ensure_ascii=True, indent=4))
    os.replace(tmp, partial)


_CONFIG: dict = {}


def pytest_configure(config):
    _CONFIG.clear()
    _CONFIG["config"] = config
    path = _json_path(config)
    if path is not None:  # an earlier run's partial file must never stand in for this run's
        partial_path(path).unlink(missing_ok=True)


def pytest_unconfigure(config):
    path = _json_path(config)
    if path is not None and path.is_file() and path.stat().st_size > 0:
        partial_path(path).unlink(missing_ok=True)
    _CONFIG.clear()
