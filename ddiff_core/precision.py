"""The one map from precision names (flags, accelerate's mixed_precision) to torch dtypes."""

from __future__ import annotations

import torch

_DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_of(name: str | None) -> torch.dtype:
    """'fp32'/'no'/None -> float32, 'fp16' -> float16, 'bf16' -> bfloat16.

    Raises:
        ValueError: an unknown name.
    """
    if name is None:
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown precision {name!r}; known: {', '.join(_DTYPES)}")
    return _DTYPES[name]
