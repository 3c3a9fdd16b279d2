"""Shared fixtures: tiny offline models built once per session, and a runner for the training script."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data" / "demo"
DEMO_IMAGES = len(list(DEMO_DATA.glob("*.jpg")))  # 12 squares and 5 film/portrait frames
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    from ddiff_core.tiny import save_tiny_pipeline

    return save_tiny_pipeline("flux", tmp_path_factory.mktemp("models") / "tiny-flux", "tiny", seed=0)


def train_args(model: Path, output_dir: Path, *extra: str, data: Path = DEMO_DATA) -> list[str]:
    """Fast defaults for the tiny model: 64 px, batch 2, short prompts, no tracker."""
    return [
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
        "--output_dir", str(output_dir), "--resolution", "64", "--train_batch_size", "2",
        "--max_sequence_length", "32", "--seed", "0", "--report_to", "none", *extra,
    ]


def script_command(script: str, args: list[str], *, processes: int = 0, env: dict | None = None) -> tuple[list, dict]:
    """The command line for ``scripts/<script>``: plain (processes=0) or ``accelerate launch`` on 1 or 2 CPU processes."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    script_path = str(REPO / "scripts" / script)
    if processes == 0:
        cmd = [sys.executable, script_path, *args]
    else:
        config = "cpu_ddp.yaml" if processes == 2 else "cpu.yaml"
        full_env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / config), script_path, *args]
        if processes == 2:  # a free port per run, so parallel or back-to-back runs never collide
            cmd[3:3] = ["--main_process_port", str(_free_port())]
    return cmd, full_env


def start_script(script: str, args: list[str], *, processes: int = 0) -> subprocess.Popen:
    """Starts the script in its own process group (so a test can signal or kill every process of it)."""
    cmd, env = script_command(script, args, processes=processes)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def run_script(script: str, args: list[str], *, processes: int = 0, env: dict | None = None, check: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``scripts/<script>`` to the end; raises with its output when it fails and ``check`` is set."""
    cmd, full_env = script_command(script, args, processes=processes, env=env)
    result = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def run_main(script: str, args: list[str], capsys) -> tuple[int, str]:
    """Calls ``scripts/<script>``'s ``main(args)`` in this process: for the errors a script reports before it loads
    a model (a subprocess would spend seconds importing torch and diffusers first). Returns (exit code, stderr)."""
    main = runpy.run_path(str(REPO / "scripts" / script))["main"]
    try:
        code = main(args)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def kill_tree(pid: int, sig: int = 9) -> None:
    """Signals a process and all its descendants. torchrun starts each worker in a session of its own,
    so signalling the launcher's process group would leave the workers running."""
    import psutil

    try:
        parent = psutil.Process(pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initial_lora(model: Path, family: str = "flux", seed: int = 0, rank: int = 4) -> dict:
    """The LoRA a run with this seed and rank starts from (built as the trainer builds it), keyed as saved."""
    from ddiff_core.builders import add_trainable_lora
    from ddiff_core.families import get_family
    from ddiff_core.lora import lora_state_dict

    fam = get_family(family)
    denoiser = fam.load_components(str(model))[fam.denoiser_name]
    add_trainable_lora(denoiser, fam, rank=rank, alpha=rank, dropout=0.0, lora_layers=None, seed=seed)
    return {f"{fam.denoiser_name}.{k}": v for k, v in lora_state_dict(denoiser).items()}


def assert_same_training(a: Path, b: Path, start: dict, *, rtol: float = 1e-5, max_relative: float = 1e-3) -> None:
    """Two runs that should train the same LoRA, compared as claimed on any CPU (kernels sum in an order that depends
    on batch size and instruction set): per-step losses to ``rtol``, and the weights' difference relative to the
    update, ``|W_a - W_b| / |W_b - W_0| < max_relative``."""
    import json

    import torch
    from safetensors.torch import load_file

    losses = [[json.loads(line)["loss"] for line in (o / "metrics.jsonl").read_text().splitlines()] for o in (a, b)]
    assert len(losses[0]) == len(losses[1])
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=rtol, atol=0)
    wa, wb = (load_file(o / "pytorch_lora_weights.safetensors") for o in (a, b))
    assert wa.keys() == wb.keys() == start.keys()
    diff = torch.cat([(wa[k] - wb[k]).flatten() for k in wa]).norm()
    update = torch.cat([(wb[k] - start[k]).flatten() for k in wb]).norm()
    assert update > 0 and diff / update < max_relative, f"relative difference {diff / update:.2e}"


def assert_resume_from_copy_is_exact(model: Path, tmp_path: Path, args: list[str], *, step: int = 3) -> None:
    """Trains ``args`` whole, then again from a copy of its ``checkpoint-<step>`` (with run.json and the log up to
    that step) in a new folder: the same LoRA bit for bit, and the same loss and learning rate at every step."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file

    full, out = tmp_path / "full", tmp_path / "resumed"
    run_script("train_lora.py", train_args(model, full, *args))
    shutil.copytree(full / f"checkpoint-{step}", out / f"checkpoint-{step}")
    shutil.copy(full / "run.json", out / "run.json")
    metrics = (full / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(metrics[:step]) + "\n")
    run_script("train_lora.py", train_args(model, out, *args, "--resume_from_checkpoint", "latest"))
    a, b = (load_file(o / "pytorch_lora_weights.safetensors") for o in (full, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def log(lines):
        return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, lines)]

    assert log((out / "metrics.jsonl").read_text().splitlines()) == log(metrics)
