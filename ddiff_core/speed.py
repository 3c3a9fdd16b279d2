"""Speed settings of the denoiser: regional compilation, dosed gradient checkpointing, the attention backend, no
needless dtype casts.

Regional compilation compiles each repeated block class once (FLUX's double- and single-stream blocks, SD3's joint
blocks, the UNets' transformer blocks) and reuses the graph across the blocks of that class, so compile time is
seconds, not minutes. Shapes are fixed per run (per bucket with buckets), so the number of graphs stays bounded; the
count is read from dynamo and logged. Validation runs the blocks uncompiled, so it never recompiles a training graph.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import torch

logger = logging.getLogger(__name__)


def repeated_blocks(denoiser, family) -> list[torch.nn.Module]:
    """The denoiser's repeated blocks, in order (the family names their classes)."""
    names = set(family.repeated_block_classes(denoiser))
    return [m for m in denoiser.modules() if type(m).__name__ in names]


# Graphs dynamo may keep per code object. Every compiled block runs through nn.Module._call_impl, so all block classes,
# frames (buckets) and modes share one budget; dynamo's default of 8 would send blocks back to eager, with only a
# warning, once a run had more than a few buckets.
RECOMPILE_LIMIT = 128


def default_compile(family_name: str, device_type: str, base_quantization: str, sharded: bool) -> bool:
    """``--compile`` left unset: on where it was measured to pay, FLUX with an unquantized base on a CUDA GPU (1.27-1.35x
    at 1024 px without checkpointing, 1.41-1.54x with it, over two H200 windows; benchmarks/NOTES.md), not sharded; off on
    the CPU (no gain measured) and where the GPU has not measured it (other families, a quantized base, FSDP)."""
    return device_type == "cuda" and family_name == "flux" and base_quantization == "none" and not sharded


def compile_blocks(denoiser, family, *, mode: str | None = None) -> int:
    """Compiles every repeated block in place (``nn.Module.compile``: the module object stays, so peft, DDP and the
    checkpoint keys see the same names). Returns the number of blocks compiled."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    blocks = repeated_blocks(denoiser, family)
    for block in blocks:
        if _holds_tensor_subclass(block):
            block._ddiff_forward_before_copy = block.__dict__.get("forward")
            block.forward = functools.partial(_outputs_copied, block.forward)
        block.compile(dynamic=False, mode=mode)
    return len(blocks)


def _holds_tensor_subclass(block) -> bool:
    """Whether the block's weights are tensor subclasses (torchao's int8/fp8 weights)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return any(is_traceable_wrapper_subclass(p) for p in block.parameters())


def _outputs_copied(forward, *args, **kwargs):
    """The block's outputs as tensors of their own. With tensor-subclass weights, AOT autograd refuses a graph whose
    outputs alias one another, and FLUX's single-stream block returns two views of one tensor; inside the compiled
    graph the copy is written by the kernel that computes it."""
    out = forward(*args, **kwargs)
    if isinstance(out, tuple):
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in out)
    return out


def uncompile_blocks(denoiser, family) -> None:
    for block in repeated_blocks(denoiser, family):
        block._compiled_call_impl = None
        if "_ddiff_forward_before_copy" in block.__dict__:
            before = block.__dict__.pop("_ddiff_forward_before_copy")
            if before is None:
                del block.forward  # the class's forward again
            else:
                block.forward = before  # the checkpointing wrapper


@contextlib.contextmanager
def blocks_uncompiled(denoiser, family):
    """The blocks run eagerly inside (validation: other shapes and no grad would otherwise add graphs)."""
    blocks = repeated_blocks(denoiser, family)
    saved = [b._compiled_call_impl for b in blocks]
    for b in blocks:
        b._compiled_call_impl = None
    try:
        yield
    finally:
        for b, impl in zip(blocks, saved):
            b._compiled_call_impl = impl


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (each recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def recompile_limit_hits() -> int:
    """How often dynamo gave up compiling a frame for hitting its recompile limit (that frame then runs eagerly)."""
    from torch._dynamo.utils import counters

    return sum(n for reason, n in counters["unimplemented"].items() if "recompile_limit" in str(reason)
               or "cache_size_limit" in str(reason))


def _checkpointed_forward(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def checkpoint_blocks(denoiser, family, every: int = 1) -> int:
    """Recomputes every ``every``-th repeated block's activations in the backward (1: all, like diffusers'
    ``enable_gradient_checkpointing``; 2: every other block, about half the saving for about half the recompute).
    Returns the number of blocks checkpointed."""
    blocks = repeated_blocks(denoiser, family)
    chosen = blocks[::every]
    for block in chosen:
        block.forward = functools.partial(_checkpointed_forward, block.forward)
        block._ddiff_checkpointed = True
    return len(chosen)


def uncheckpoint_blocks(denoiser, family) -> None:
    for block in repeated_blocks(denoiser, family):
        if getattr(block, "_ddiff_checkpointed", False):
            del block.forward  # the class's forward again
            del block._ddiff_checkpointed


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor's copy on ``device`` that does not make the host wait for the GPU's queued work, as a blocking
    copy does (torch synchronizes the stream after it): once per micro-batch, that would stop the host from queueing
    the next step's kernels while the GPU works. To CUDA it goes from pinned memory (a copy from pageable memory may
    still wait, to stage it); torch's pinned-memory cache keeps each block until its copy is done."""
    device = torch.device(device)
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def skip_lora_input_casts(denoiser, skip: bool = True) -> int:
    """Turns off peft's cast of each LoRA layer's input to the LoRA's dtype, where autocast makes it a round trip
    (call it only for a model whose forward runs under autocast: without it the dtypes would not meet).

    The frozen weights are bf16 (or fp16) and the LoRA fp32, so the step runs under autocast. peft then casts each
    LoRA layer's half-precision input up to fp32, and autocast casts it straight back down for the matmul: two
    activation-sized copies per LoRA layer in the forward, two more in the backward, and the input saved twice for
    the backward. The round trip is exact (every bf16/fp16 value is an fp32 value), so without it the step computes
    the same bits. Layers with dropout keep the cast (dropout in another dtype could round differently), and so does
    a model whose frozen weights are fp32 (no autocast, nothing to skip). The LoRA weights themselves are cast once
    per forward: autocast caches the cast of a leaf parameter. ``skip=False`` puts peft's default back on every
    LoRA layer (the benchmarks' "before"). Returns the number of layers changed.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer)]
    if not skip:
        for module in layers:
            module.cast_input_dtype_enabled = True
        return len(layers)
    frozen = {p.dtype for p in denoiser.parameters() if not p.requires_grad and p.is_floating_point()}
    if not frozen & set(LOW_PRECISION):
        return 0
    layers = [m for m in layers if all(isinstance(d, torch.nn.Identity) for d in m.lora_dropout.values())]
    for module in layers:
        module.cast_input_dtype_enabled = False
    return len(layers)


# Backends that fail on a known stack, refused with the reason instead of a device fault mid-run.
KNOWN_BAD = {
    "_native_cudnn": "the cuDNN SDPA backend crashes in the backward with an illegal memory access (seen on H100 and "
                     "H200, torch 2.11); use 'native' (flash), or 'ddiff_cudnn' (measured on an H200)",
}


# ddiff's own backends: name -> (the diffusers backend whose slot it takes for the run, what it is).
DDIFF_BACKENDS = {
    "ddiff_cudnn": ("_native_cudnn", "cuDNN's SDPA as diffusers' _native_cudnn calls it, with the output's gradient "
                                     "handed to cuDNN's backward in the output's own layout (FLUX's blocks send it in "
                                     "two others, on which torch's cuDNN backward crashes)"),
}


def attention_backends() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return sorted([b.value for b in AttentionBackendName] + list(DDIFF_BACKENDS))


class GradInOutputLayout(torch.autograd.Function):
    """The identity, whose backward hands the gradient on laid out as the forward's tensor (a copy only where it is
    not). cuDNN's attention backward gets the gradient of its output in the output's own strides; FLUX's double-stream
    blocks send it contiguous in (B, S, H*D), the single-stream blocks as a slice of a wider concatenation. Under
    torch.compile dynamo hands a Function's backward contiguous gradients already, and inductor lays the attention
    backward's inputs out as it requires; what reaches cuDNN there is the compiled graph's choice."""

    @staticmethod
    def forward(ctx, x):
        ctx.size, ctx.strides = x.size(), x.stride()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad.stride() == ctx.strides:
            return grad
        out = torch.empty_strided(ctx.size, ctx.strides, dtype=grad.dtype, device=grad.device)
        return out.copy_(grad)


def layout_matched_attention(backend):
    """An attention function for diffusers' dispatcher: SDPA on ``backend`` (an ``SDPBackend``) over contiguous
    (B, H, S, D) copies of the (B, S, H, D) inputs, as diffusers' ``_native_cudnn`` calls it, with the output's
    gradient in the output's layout (``GradInOutputLayout``)."""
    from torch.nn.attention import sdpa_kernel

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  return_lse=False, _parallel_config=None):
        if return_lse or _parallel_config is not None:
            raise ValueError("ddiff's attention backends support neither context parallelism nor return_lse")
        q, k, v = (x.permute(0, 2, 1, 3).contiguous() for x in (query, key, value))
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                                   is_causal=is_causal, scale=scale,
                                                                   enable_gqa=enable_gqa)
        return GradInOutputLayout.apply(out).permute(0, 2, 1, 3)

    return attention


_REPLACED: dict = {}  # diffusers' registry entries a ddiff backend stands in for, to put back


def install_attention(slot: str, function) -> None:
    """``function`` answers for diffusers' backend ``slot`` (its registry entry, checks kept) until
    ``reset_attention_backend``."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry as registry

    key = AttentionBackendName(slot)
    if key not in _REPLACED:
        _REPLACED[key] = (registry._backends[key], registry._supported_arg_names[key])
    registry._backends[key] = function
    registry._supported_arg_names[key] = set(inspect.signature(function).parameters)


def set_attention_backend(denoiser, name: str) -> None:
    """The denoiser's attention on ``name``: one of diffusers' backends, or one of ddiff's (``DDIFF_BACKENDS``)."""
    if name in DDIFF_BACKENDS:
        from torch.nn.attention import SDPBackend

        slot, what = DDIFF_BACKENDS[name]
        install_attention(slot, layout_matched_attention(SDPBackend.CUDNN_ATTENTION))
        logger.info("attention: %s, %s", name, what)
        name = slot
    denoiser.set_attention_backend(name)


def check_attention_backend(name: str | None, device_type: str, family=None) -> None:
    """Raises ValueError (one line) for an unknown backend, one known to fail, one whose package is missing, one that
    needs CUDA on a CPU, or a family whose attention does not go through diffusers' dispatcher."""
    if name in (None, "native"):
        return
    if family is not None and not family.attention_backends:
        raise ValueError(f"--attention_backend: {family.name}'s attention does not go through diffusers' attention "
                         "dispatcher (only FLUX's does in diffusers 0.42); leave it unset")
    known = attention_backends()
    if name not in known:
        raise ValueError(f"--attention_backend {name!r} is not one of diffusers' or ddiff's backends "
                         f"({', '.join(known)})")
    if name in KNOWN_BAD:
        raise ValueError(f"--attention_backend {name} is refused: {KNOWN_BAD[name]}")
    if name in DDIFF_BACKENDS:
        if device_type != "cuda" or not torch.backends.cudnn.is_available():
            raise ValueError(f"--attention_backend {name} needs a CUDA device with cuDNN; this run is on {device_type}")
        return
    if name.endswith("_hub"):
        raise ValueError(f"--attention_backend {name} is refused: it fetches kernel code from the Hugging Face Hub "
                         "at run time; install the kernel package and name its local backend instead")
    if device_type != "cuda" and name not in ("_native_math", "native"):
        raise ValueError(f"--attention_backend {name} needs a CUDA device; this run is on {device_type}")
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as err:  # its package is missing or too old
        raise ValueError(f"--attention_backend {name}: {str(err).splitlines()[0]}") from err


def reset_attention_backend(denoiser) -> None:
    """The model's and the process's attention back to diffusers' default (set_attention_backend changes both)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    denoiser.reset_attention_backend()
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    for key, (function, arg_names) in _REPLACED.items():  # diffusers' own entries back
        _AttentionBackendRegistry._backends[key] = function
        _AttentionBackendRegistry._supported_arg_names[key] = arg_names
    _REPLACED.clear()
