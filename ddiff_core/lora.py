"""LoRA adapters: add to a denoiser, save in diffusers format with metadata, write the model card."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from ddiff_core.atomic import atomic_write, atomic_write_text

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
EMA_WEIGHTS_NAME = "pytorch_lora_weights_ema.safetensors"  # load with weight_name=EMA_WEIGHTS_NAME


def add_lora(denoiser, family, *, rank: int, alpha: int, dropout: float, lora_layers: str | None) -> LoraConfig:
    """Adds a trainable LoRA adapter (Gaussian init, as upstream) and returns its config.

    Raises:
        ValueError: the requested layers match no module of the denoiser.
    """
    targets = family.lora_target_modules(lora_layers)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets)
    try:
        denoiser.add_adapter(config)
    except ValueError as err:
        raise ValueError(f"--lora_layers {lora_layers or family.default_lora_preset!r} matches no layer: {err}") from err
    return config


def lora_state_dict(denoiser) -> dict[str, torch.Tensor]:
    """The adapter's weights (fp32, CPU), keyed as diffusers' ``save_lora_weights`` expects."""
    state = get_peft_model_state_dict(denoiser)
    # A sharded model (FSDP) holds DTensors: every process gathers the whole tensor (a collective: call on all).
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def lora_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the adapter's tensors in key order: equal digests, bitwise-equal weights."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes())
    return digest.hexdigest()


def lora_metadata(config: LoraConfig) -> dict:
    """The LoraConfig as plain JSON types (sets become sorted lists), for the safetensors header."""
    meta = config.to_dict()
    return json.loads(json.dumps(meta, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def save_lora(output_dir: str | Path, family, denoiser, config: LoraConfig, weight_name: str = LORA_WEIGHTS_NAME) -> Path:
    """Writes ``weight_name`` (``pytorch_lora_weights.safetensors``) atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".lora-") as tmp:  # the family's writer picks the name
        family.save_lora_weights(tmp, lora_state_dict(denoiser), lora_metadata(config))
        return atomic_write(output_dir / weight_name,
                            lambda dst: shutil.copyfile(Path(tmp) / LORA_WEIGHTS_NAME, dst))


KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"


def save_kohya_copy(output_dir: str | Path, family, denoiser, config: LoraConfig) -> Path:
    """A second copy in the kohya-ss key layout (AUTOMATIC1111, ComfyUI), via diffusers' converter.

    diffusers writes each module's alpha as its rank, which is right only when alpha == rank; the real
    ``lora_alpha`` is written here, so the strength matches the diffusers copy.
    """
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    state = {f"{family.kohya_prefix}.{k}": v for k, v in lora_state_dict(denoiser).items()}
    kohya = convert_state_dict_to_kohya(state)
    kohya = {k: (torch.tensor(float(config.lora_alpha)) if k.endswith(".alpha") else v) for k, v in kohya.items()}
    metadata = {"format": "pt", "ss_network_dim": str(config.r), "ss_network_alpha": str(config.lora_alpha)}
    return atomic_write(Path(output_dir) / KOHYA_WEIGHTS_NAME, lambda tmp: save_file(kohya, str(tmp), metadata=metadata))


def trigger_phrase(captions: list[str], instance_prompt: str | None = None) -> str | None:
    """The ``<token>`` that every caption carries (director-diffusion's layout), else the instance prompt."""
    common = None
    for caption in captions:
        tokens = set(re.findall(r"<[^<>\s]+>", caption))
        common = tokens if common is None else common & tokens
    if common:
        return sorted(common, key=lambda t: (-len(t), t))[0]
    return instance_prompt


def write_model_card(output_dir: str | Path, *, family, base_model: str, trigger: str | None, config_dict: dict,
                     lora_config: LoraConfig, global_step: int) -> Path:
    """A ``README.md`` with hub-style front matter: base model, trigger phrase, settings, how to load."""
    pipeline = family.pipeline_class_path.split(":")[1]
    settings = {k: config_dict[k] for k in (
        "resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
        "mixed_precision", "rank", "lora_alpha", "seed", "cache_latents", "cache_text_embeddings") if k in config_dict}
    prompt = f"{trigger} a city street at night" if trigger else "a city street at night"
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: diffusers",
        "tags: [lora, ddiff, text-to-image, " + family.name + "]",
        f"instance_prompt: {json.dumps(trigger) if trigger else 'null'}",
        "---",
        "",
        f"# {Path(output_dir).name}",
        "",
        f"A LoRA for `{base_model}` ({family.name}), trained with ddiff for {global_step} steps.",
        "",
        f"Trigger phrase: `{trigger}`" if trigger else "No trigger phrase.",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in settings.items()],
        f"| target_modules | `{lora_config.target_modules}` |",
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline}",
        "",
        f'pipe = {pipeline}.from_pretrained("{base_model}", dtype=torch.bfloat16)',
        f'pipe.load_lora_weights("{Path(output_dir).name}")',
        f'image = pipe("{prompt}").images[0]',
        "```",
        "",
    ]
    return atomic_write_text(Path(output_dir) / "README.md", "\n".join(lines))

