"""Benchmark cases: for each fix, a "before" and an "after" callable built by ``CASES[name](env, variant)``.

Each variant is set up on its own, so a fresh process can build exactly one and report its peak memory:

    python -m benchmarks.cases vae_scaling before --size small --device cpu --dtype fp32 --repeat 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.baselines import director_diffusion as before
from ddiff_core.builders import add_trainable_lora, build_data, build_optimizer, load_base, trainable_params
from ddiff_core.caching import build_training_features, release_covered_encoders
from ddiff_core.config import TrainConfig
from ddiff_core.data import load_records, screen_records
from ddiff_core.families import get_family
from ddiff_core.precision import dtype_of
from ddiff_core.tiny import save_tiny_lora
from ddiff_core.speed import skip_lora_input_casts
from ddiff_core.trainer import compute_loss
from ddiff_core.validation import ValidationRunner

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "benchmarks" / ".models"
DEMO = REPO / "data" / "demo"
RESOLUTION = {"tiny": 64, "small": 128}


class NotApplicable(Exception):
    """This before/after pair does not exist for this family."""


@dataclass(frozen=True)
class Env:
    size: str = "tiny"
    device: str = "cpu"
    dtype: str = "fp32"
    family: str = "flux"
    attention: str | None = None  # --attention-backend: the trainer-step benchmarks' attention (default: diffusers')

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_of(self.dtype)

    @property
    def resolution(self) -> int:
        return RESOLUTION[self.size]


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def model_dir(size: str, family: str = "flux") -> Path:
    """The random-weight model of this family and size, built once and kept in benchmarks/.models (atomically)."""
    path = MODELS / f"{family}-{size}"
    if not (path / "model_index.json").exists():
        from ddiff_core.tiny import save_tiny_pipeline

        MODELS.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=MODELS))
        save_tiny_pipeline(family, tmp / "m", size, seed=0)
        try:
            os.replace(tmp / "m", path)
        except OSError:  # another process won the race
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _components(env: Env, dtype: torch.dtype | None = None):
    family = get_family(env.family)
    return family, load_base(family, str(model_dir(env.size, env.family)), dtype=dtype or env.torch_dtype,
                             device=env.device)


def _demo_records():
    """The demo images, screened as the trainer screens them (sizes known, so crops need no decoding)."""
    records, _ = load_records(TrainConfig(instance_data_dir=str(DEMO)))
    return screen_records(records)[0]


def train_config(env: Env, **overrides) -> TrainConfig:
    """The benchmarks' run: the demo data at the size's resolution, batch 2, rank 16, center crops."""
    settings = dict(pretrained_model_name_or_path=str(model_dir(env.size, env.family)), instance_data_dir=str(DEMO),
                    resolution=env.resolution, train_batch_size=2, rank=16, lora_alpha=16, center_crop=True,
                    max_sequence_length=64, seed=0)
    return TrainConfig(**{**settings, **overrides})


# -- training-step cases -------------------------------------------------------------------------
def _training(env: Env, *, gradient_checkpointing: bool = False, weight_dtype: torch.dtype | None = None,
              cached: bool = True, keep_vae: bool = False, bucket=None, compile: bool = False):
    """A training step built as the trainer builds it (base, objective, data, caches, LoRA, optimizer)."""
    weight_dtype = weight_dtype or env.torch_dtype
    cfg = train_config(env, gradient_checkpointing=gradient_checkpointing, cache_latents=cached,
                       cache_text_embeddings=cached)
    family, comps = _components(env, weight_dtype)
    objective = family.training_objective(comps, family.loss_settings(cfg))
    latent_norm = family.latent_norm(comps["vae"].config)
    records = _demo_records()
    data = build_data(records, cfg, seed=0, targets=[bucket] * len(records) if bucket else None)
    features = build_training_features(  # content-keyed caches: safe to share between cases and runs
        family, comps, data.dataset, records, cache_latents=cfg.cache_latents, cache_text=cfg.cache_text_embeddings,
        cache_dir=MODELS / "cache", model_id=f"{env.family}-{env.size}", dtype=weight_dtype, seed=cfg.seed,
        device=env.device, max_sequence_length=cfg.max_sequence_length, show_progress=False)
    release_covered_encoders(features, keep_vae=keep_vae)  # as the trainer does once the caches cover them
    denoiser = comps[family.denoiser_name]
    add_trainable_lora(denoiser, family, rank=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       lora_layers=cfg.lora_layers, seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing,
                       compile=compile)
    denoiser.train()
    optimizer = build_optimizer(trainable_params(denoiser), cfg)

    def forever():
        while True:
            yield from data.loader  # cached: no decoding; uncached: decode from disk

    generator = torch.Generator(env.device).manual_seed(0)
    autocast = torch.autocast(torch.device(env.device).type, weight_dtype, enabled=weight_dtype != torch.float32)
    return SimpleNamespace(family=family, comps=comps, denoiser=denoiser, optimizer=optimizer, objective=objective,
                           features=features, generator=generator, autocast=autocast, weight_dtype=weight_dtype,
                           latent_norm=latent_norm, batches=forever())


def _step(t, loss_fn) -> None:
    t.optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    t.optimizer.step()


def _ddiff_step(t):
    def step():
        batch = next(t.batches)
        _step(t, lambda: compute_loss(t.objective, t.denoiser, t.features, t.latent_norm, batch, t.generator,
                                      t.weight_dtype, autocast=t.autocast))
    return step


def vae_scaling(env: Env, variant: str):
    """Fix 1: the VAE shift/scale inline (director-diffusion) vs ddiff's one LatentNorm, in a whole training step."""
    t = _training(env, keep_vae=True)  # the inline code reads the VAE's config
    if variant == "after":
        return _ddiff_step(t)
    if t.comps["vae"].config.get("shift_factor") is None:
        # director-diffusion's inline copy assumes FLUX's shift_factor; on this VAE it would raise a TypeError.
        raise NotApplicable(f"the inline 'before' code needs a VAE shift_factor, which {env.family}'s VAE lacks")
    def step():
        batch = next(t.batches)
        _step(t, lambda: before.compute_loss_inline_scaling(
            t.objective, t.denoiser, t.comps["vae"], t.features.latent_params(batch), t.features.text_embeds(batch),
            t.generator, t.weight_dtype, t.autocast))
    return step


def feature_caches(env: Env, variant: str):
    """Latent and text-embedding caches off (decode + VAE + text encoders every step) vs on."""
    return _ddiff_step(_training(env, cached=variant == "after"))


def gradient_checkpointing(env: Env, variant: str):
    """Activation memory traded for recomputation: off vs on."""
    return _ddiff_step(_training(env, gradient_checkpointing=variant == "after"))


def regional_compile(env: Env, variant: str):
    """The denoiser eager vs regionally compiled (--compile), whole cached training step (compiled before timing)."""
    return _ddiff_step(_training(env, compile=variant == "after"))


def mixed_precision(env: Env, variant: str):
    """Frozen weights in fp32 vs bf16 (LoRA in fp32, autocast)."""
    return _ddiff_step(_training(env, weight_dtype=torch.float32 if variant == "before" else torch.bfloat16))


def lora_input_casts(env: Env, variant: str):
    """bf16 frozen weights, fp32 LoRA under autocast: peft's round-trip cast of each LoRA input kept vs skipped."""
    t = _training(env, weight_dtype=torch.bfloat16)
    if variant == "before":
        skip_lora_input_casts(t.denoiser, skip=False)
    return _ddiff_step(t)


def bucket_step(env: Env, bucket):
    """One cached training step with every image in ``bucket`` (height x width): equal area, equal cost?"""
    return _ddiff_step(_training(env, bucket=bucket))


# -- validation cases ----------------------------------------------------------------------------
def _validation(env: Env):
    family, comps = _components(env)
    denoiser = comps[family.denoiser_name]
    add_trainable_lora(denoiser, family, rank=16, alpha=16, dropout=0.0, lora_layers=None, seed=0)
    runner = ValidationRunner(family, comps, denoiser, ["<demo-style> a cat on a table"], num_images=4, seed=0,
                              resolution=env.resolution, num_inference_steps=4, guidance_scale=3.5,
                              max_sequence_length=64, output_dir=Path(tempfile.mkdtemp()), device=env.device,
                              dtype=env.torch_dtype)
    return family, denoiser, runner


def validation_reload(env: Env, variant: str):
    """Fix 2: a pipeline from_pretrained at every validation vs one assembled once from memory (4 images, batched)."""
    family, denoiser, runner = _validation(env)
    if variant == "after":
        return lambda: runner.generate()
    return lambda: before.validation_with_reload(family, model_dir(env.size, env.family), denoiser, runner.embeds,
                                                 runner.seeds, env.resolution, 4, env.torch_dtype)


def validation_batching(env: Env, variant: str):
    """Fix 6: 4 validation images one call each vs one batched call (same seeds, same images)."""
    _, _, runner = _validation(env)
    if variant == "after":
        return lambda: runner.generate()
    return lambda: before.validation_one_by_one(runner.pipeline, runner.embeds, runner.seeds, env.resolution, 4)


# -- serving cases -------------------------------------------------------------------------------
def lora_dir(env: Env, count: int = 3) -> Path:
    """``count`` random LoRAs (non-zero B) in ddiff's output layout, built once."""
    root = MODELS / f"loras-{env.family}-{env.size}"
    if len(list(root.glob("*/pytorch_lora_weights.safetensors"))) >= count:
        return root
    family, comps = _components(Env(env.size, "cpu", "fp32", env.family))
    for i, name in enumerate(["anderson-style", "nolan-style", "villeneuve-style"][:count]):
        save_tiny_lora(env.family, comps[family.denoiser_name], root / name, seed=i, rank=16, std=0.02,
                       trigger=f"<{name}>")
    return root


def serving(env: Env, variant: str):
    """Fix 3: a base pipeline plus one pipeline per LoRA vs one pipeline holding the LoRAs as named adapters.
    Timed: switching base -> LoRA -> base and generating one image each time."""

    family = get_family(env.family)
    loras = lora_dir(env)
    names = [p.name for p in sorted(loras.iterdir())]
    kwargs = dict(prompt="a street at night", height=env.resolution, width=env.resolution, num_inference_steps=2,
                  output_type="pt", **family.prompt_kwargs(64))
    if variant == "before":
        server = before.TwoPipelineServer(family, model_dir(env.size, env.family), {n: loras / n for n in names},
                                          env.torch_dtype)
        for pipe in [server.base, *server.styled.values()]:
            pipe.to(env.device)

        def request():
            for name in (None, names[0], None):
                server.pipeline_for(name)(**kwargs, generator=torch.Generator().manual_seed(0))
        return request
    from ddiff_core.serving.server import StyleServer

    server = StyleServer.load(family, str(model_dir(env.size, env.family)), loras,
                              Path(tempfile.mkdtemp()) / "votes.sqlite", device=env.device, dtype=env.torch_dtype,
                              max_sequence_length=64)

    def request():
        for name in (None, names[0], None):
            with server.bank.lock:
                server.bank.select(name)
                server.pipeline(**kwargs, generator=torch.Generator().manual_seed(0))
    return request


def lora_switch(env: Env, variant: str):
    """Fix 3, switch cost alone: one switch from one LoRA to another per call: picking the other pipeline (before)
    vs set_adapters on the one pipeline (after)."""
    from ddiff_core.serving.adapters import AdapterBank, LoraCatalog

    loras = lora_dir(env)
    names = [p.name for p in sorted(loras.iterdir())]
    family = get_family(env.family)
    if variant == "before":
        server = before.TwoPipelineServer(family, model_dir(env.size, env.family), {n: loras / n for n in names},
                                          env.torch_dtype)
        turn = itertools.cycle(names[:2])
        return lambda: server.pipeline_for(next(turn))
    pipe = family.load_pipeline(str(model_dir(env.size, env.family)), dtype=env.torch_dtype)
    bank = AdapterBank(pipe, LoraCatalog(loras))
    turn = itertools.cycle(names[:2])
    return lambda: bank.select(next(turn))


def lora_list(env: Env, variant: str):
    """Fix 5: building the page asks for the LoRA list 3 times: a folder scan each time vs the cached catalog."""
    from ddiff_core.serving.adapters import LoraCatalog

    loras = lora_dir(env)
    if variant == "before":
        return lambda: [before.get_lora_options(loras) for _ in range(3)]
    catalog = LoraCatalog(loras)
    return lambda: [[i.name for i in catalog.list()] for _ in range(3)]


def dataloader(env: Env, variant: str):
    """ddiff's data loader over one epoch of decoded images (48 items, batch 4): 0 workers vs 2 persistent workers
    (with pinned memory on CUDA)."""
    cfg = train_config(env, repeats=4, train_batch_size=4, center_crop=False,
                       dataloader_num_workers=0 if variant == "before" else 2)
    data = build_data(_demo_records(), cfg, seed=0, pin_memory=torch.device(env.device).type == "cuda")

    def epoch():
        for batch in data.loader:
            batch["pixels"].to(env.device, non_blocking=True)
    return epoch


def ddp_no_sync(env: Env, variant: str):
    """Gradient accumulation (4 micro-batches) under 2-process DDP: all-reduce every micro-batch vs only the last
    (no_sync). Runs benchmarks/ddp_accumulation.py under accelerate; its own per-step median is in extra_info."""
    config = "cpu_ddp.yaml" if torch.device(env.device).type == "cpu" else "ddp.yaml"
    env_vars = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if config == "cpu_ddp.yaml":
        env_vars["ACCELERATE_USE_CPU"] = "1"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / config),
           "--main_process_port", str(port), str(REPO / "benchmarks" / "ddp_accumulation.py"), "--size", env.size, "--family", env.family,
           "--mode", "sync_every_step" if variant == "before" else "no_sync"]

    def run():
        result = subprocess.run(cmd, capture_output=True, text=True, env=env_vars, cwd=REPO, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"ddp_accumulation failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])
    return run


CASES = {
    "vae_scaling": vae_scaling,
    "validation_reload": validation_reload,
    "serving": serving,
    "lora_switch": lora_switch,
    "lora_list": lora_list,
    "validation_batching": validation_batching,
    "feature_caches": feature_caches,
    "gradient_checkpointing": gradient_checkpointing,
    "mixed_precision": mixed_precision,
    "compile": regional_compile,
    "lora_input_casts": lora_input_casts,
    "dataloader": dataloader,
    "ddp_no_sync": ddp_no_sync,
}


def main() -> None:
    """Builds one variant in this fresh process, runs it, prints peak RSS and RSS growth (JSON)."""
    import psutil

    from ddiff_core.profiling import peak_rss_mb

    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("variant", choices=["before", "after"])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--family", default="flux")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    fn = CASES[args.case](Env(args.size, args.device, args.dtype, args.family), args.variant)
    process = psutil.Process()
    before_first = process.memory_info().rss
    fn()
    after_first = process.memory_info().rss
    for _ in range(args.repeat - 1):
        fn()
    after_last = process.memory_info().rss
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "rss_growth_mb": (after_last - after_first) / 2**20,
                      "rss_before_mb": before_first / 2**20, "rss_after_mb": after_last / 2**20,
                      "calls": args.repeat}))


if __name__ == "__main__":
    main()
