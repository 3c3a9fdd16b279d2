"""What a training step will hold on the device, estimated before the first step, and what to do when it does not
fit.

weights: every parameter and buffer of the loaded modules at its stored size (quantized weights count as stored);
LoRA: fp32 weights and gradients, plus the optimizer's state (two fp32 moments for AdamW, two bytes for 8-bit Adam);
activations: per repeated block and token, ACTIVATION_BYTES x hidden width kept for the backward (about 45 bytes in
bf16, calibrated on FLUX.1-dev's transformer at 1024 px: 56.5 GiB peak without checkpointing, 25 GiB with it); with
checkpointing only each checkpointed block's input stays, plus one block's activations while it is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ACTIVATION_BYTES = 45  # per token x hidden x block, bf16 (22.5 per 2-byte element), from the full-shape measurement
GIB = 2**30


@dataclass(frozen=True)
class PeakEstimate:
    weights: int
    lora_and_optimizer: int
    activations: int | None  # None: a model this estimate has no activation model for (the UNets)

    @property
    def total(self) -> int:
        return self.weights + self.lora_and_optimizer + (self.activations or 0)

    def describe(self) -> str:
        acts = "activations not estimated" if self.activations is None else f"activations {self.activations / GIB:.1f}"
        return (f"{self.total / GIB:.1f} GiB (weights {self.weights / GIB:.1f}, LoRA + optimizer "
                f"{self.lora_and_optimizer / GIB:.2f}, {acts})")


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor stores: a quantized tensor subclass (torchao's Int8Tensor reports its bf16 view's dtype) is
    counted by the tensors it holds."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def module_bytes(module: torch.nn.Module) -> int:
    return sum(tensor_bytes(t) for t in [*module.parameters(), *module.buffers()])


def estimate_peak(components: dict, denoiser, blocks: list, *, tokens: int, batch: int, checkpointing_interval: int,
                  weight_dtype: torch.dtype, eight_bit_adam: bool = False) -> PeakEstimate:
    """The step's peak for these settings; ``checkpointing_interval`` 0 means no checkpointing, ``tokens`` the
    sequence one image and its caption make (image patches + text tokens)."""
    weights = sum(module_bytes(m) for m in {id(m): m for m in components.values()
                                            if isinstance(m, torch.nn.Module)}.values())
    lora = [p for p in denoiser.parameters() if p.requires_grad]
    state_bytes = 2 if eight_bit_adam else 8
    lora_bytes = sum(p.numel() * (4 + 4 + state_bytes) for p in lora)
    config = getattr(denoiser, "config", {})
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    if not (heads and head_dim and blocks):
        return PeakEstimate(weights, lora_bytes, None)
    hidden = heads * head_dim
    per_block = ACTIVATION_BYTES * tokens * hidden * batch * max(1, torch.finfo(weight_dtype).bits // 16)
    if checkpointing_interval:
        kept = len(blocks) - len(blocks[::checkpointing_interval])
        element = torch.finfo(weight_dtype).bits // 8
        activations = kept * per_block + len(blocks) * tokens * hidden * batch * element + per_block
    else:
        activations = len(blocks) * per_block
    return PeakEstimate(weights, lora_bytes, activations)


def out_of_memory_advice(peak_bytes: int, total_bytes: int, config) -> str:
    """One line: the measured peak and the flags that would lower it, those not already in use first."""
    advice = []
    if not config.gradient_checkpointing:
        advice.append("--gradient_checkpointing")
    elif config.gradient_checkpointing_interval > 1:
        advice.append("--gradient_checkpointing_interval 1")
    if config.base_quantization == "none":
        advice.append("--base_quantization int8 (or fp8 on Ada/Hopper, nf4)")
    elif config.base_quantization in ("int8", "fp8"):
        advice.append("--base_quantization nf4")
    if not config.use_8bit_adam and config.optimizer == "AdamW":
        advice.append("--use_8bit_adam")
    if config.train_batch_size > 1:
        advice.append("--train_batch_size 1 with --gradient_accumulation_steps")
    if not config.cache_latents:
        advice.append("--cache_latents")
    advice.append(f"a smaller --resolution than {config.resolution}")
    return (f"out of GPU memory: the peak reached {peak_bytes / GIB:.1f} GiB of the card's {total_bytes / GIB:.1f} GiB; "
            f"lower it with {', '.join(advice)}")
