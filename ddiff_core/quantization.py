"""A quantized frozen base: the denoiser's weights stored in int8 or fp8 (torchao, weight-only) or NF4
(bitsandbytes), loaded through diffusers' own quantization configs; the LoRA on top stays in full precision, so the
saved LoRA has the keys and format of an unquantized run and loads into the stock pipeline.

Each kind is checked before any model loads: the package it needs, and the device it needs (fp8 compute capability
8.9 or newer; diffusers loads NF4 weights only on a GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ddiff_core.config import ConfigError

MAX_CONFIG_BYTES = 64 << 10
# BitsAndBytesConfig's JSON keys a user may set (no code, no paths).
BNB_KEYS = {"load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
            "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage", "llm_int8_threshold", "llm_int8_skip_modules",
            "llm_int8_has_fp16_weight", "quant_method"}


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def check_quantization(kind: str, device_type: str, bnb_config_path: str | None = None) -> None:
    """Raises ConfigError (one line) when this stack or device cannot quantize the base as asked."""
    if kind == "none":
        return
    if kind in ("int8", "fp8") and not _importable("torchao"):
        raise ConfigError(f"--base_quantization {kind} needs torchao: pip install 'ddiff[quant]' (or torchao)")
    if kind == "fp8":
        if device_type != "cuda":
            raise ConfigError("--base_quantization fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, "
                              "Hopper); this run is on the CPU: use int8")
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            raise ConfigError(f"--base_quantization fp8 needs compute capability 8.9 or newer; this GPU has "
                              f"{major}.{minor}: use int8 or nf4")
    if kind == "nf4":
        if not _importable("bitsandbytes"):
            raise ConfigError("--base_quantization nf4 needs bitsandbytes: pip install 'ddiff[quant]' (or bitsandbytes)")
        if device_type != "cuda":
            raise ConfigError("--base_quantization nf4: diffusers loads bitsandbytes 4-bit weights only on a CUDA "
                              "GPU; on the CPU use int8")
        if bnb_config_path:
            read_bnb_config(bnb_config_path)


def read_bnb_config(path: str) -> dict:
    """The JSON BitsAndBytesConfig of ``--bnb_quantization_config_path``: a small object of known keys only."""
    file = Path(path)
    if not file.is_file() or file.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"--bnb_quantization_config_path {path} is not a file of at most 64 KiB")
    try:
        values = json.loads(file.read_text())
    except ValueError as err:
        raise ConfigError(f"--bnb_quantization_config_path {path} is not JSON") from err
    if not isinstance(values, dict) or set(values) - BNB_KEYS:
        raise ConfigError(f"--bnb_quantization_config_path {path}: keys must be among {', '.join(sorted(BNB_KEYS))}")
    return values


def pipeline_quantization(kind: str, denoiser_name: str, dtype: torch.dtype, bnb_config_path: str | None = None):
    """diffusers' PipelineQuantizationConfig quantizing the denoiser alone, or None for ``none``."""
    if kind == "none":
        return None
    from diffusers.quantizers import PipelineQuantizationConfig

    if kind == "nf4":
        from diffusers import BitsAndBytesConfig

        values = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype}
        if bnb_config_path:
            values = {k: v for k, v in read_bnb_config(bnb_config_path).items() if k != "quant_method"}
            if isinstance(values.get("bnb_4bit_compute_dtype"), str):
                values["bnb_4bit_compute_dtype"] = getattr(torch, values["bnb_4bit_compute_dtype"])
        config = BitsAndBytesConfig(**values)
    else:
        from diffusers import TorchAoConfig
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

        # set_inductor_config=False: torchao would otherwise switch on TF32 and slow compile-time tuning process-wide
        config = TorchAoConfig(Int8WeightOnlyConfig(set_inductor_config=False) if kind == "int8"
                               else Float8WeightOnlyConfig(set_inductor_config=False))
    return PipelineQuantizationConfig(quant_mapping={denoiser_name: config})


def _is_quantized(weight) -> bool:
    # bitsandbytes stores uint8 data; torchao's weights are tensor subclasses that report the original float dtype.
    return isinstance(weight, torch.Tensor) and (not weight.is_floating_point() or type(weight.data) is not torch.Tensor)


def _to_autocast_dtype(module, args):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if x.dtype != dtype:
            return (x.to(dtype), *args[1:])
    return None


def follow_autocast(model: torch.nn.Module) -> int:
    """Makes every layer with quantized weights take its input in the autocast dtype, as ``nn.Linear`` does.

    torchao's quantized weights take ``F.linear`` over before autocast sees it, and its int8 layer, like
    bitsandbytes' 4-bit layer, returns its input's dtype. On CUDA, autocast runs ``layer_norm`` in fp32 and FLUX feeds
    its output straight into the next linear layer: that layer's output then stays fp32, and so do the residual
    stream from there on, the activations saved for the backward, and the elementwise work (on an H200 at 1024 px,
    2.1-2.2 GiB above the estimate with int8 and NF4). An unquantized base is back in bf16 one layer later. Outside
    autocast the hook changes nothing. Returns the number of layers hooked (each once)."""
    count = 0
    for module in model.modules():
        if _is_quantized(getattr(module, "weight", None)) and not getattr(module, "_ddiff_follows_autocast", False):
            module.register_forward_pre_hook(_to_autocast_dtype)
            module._ddiff_follows_autocast = True
            count += 1
    return count


def quantize_in_memory(model: torch.nn.Module, kind: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Quantizes a denoiser already in memory with the libraries diffusers' configs use (torchao's ``quantize_``,
    bitsandbytes' 4-bit linear layers): for a benchmark's random full-size model, which is never written to disk.
    NF4 layers quantize when moved to the GPU, one at a time."""
    if kind == "none":
        return
    if kind in ("int8", "fp8"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False) if kind == "int8"
                  else Float8WeightOnlyConfig(set_inductor_config=False))
        follow_autocast(model)
        return
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:  # every linear layer, as diffusers' NF4 load converts them
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer.to(device))  # quantized here, one layer at a time
    model.is_loaded_in_4bit = True  # as diffusers' 4-bit load marks it: peft then wraps these layers in its bnb LoRA
    follow_autocast(model)
