"""The torchvision names diffusers' example training scripts use, on PIL and torch (benchmarks only; see README.md)."""

from . import transforms

__all__ = ["transforms"]  # ``from torchvision import transforms``
