"""Image transforms on PIL images (and ``Normalize`` on tensors), with torchvision's semantics for what they share."""

from __future__ import annotations

import enum

import numpy as np
import torch
from PIL import Image

from . import functional


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"
    BOX = "box"
    HAMMING = "hamming"


_PIL = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.BILINEAR: Image.BILINEAR,
        InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.LANCZOS: Image.LANCZOS,
        InterpolationMode.BOX: Image.BOX, InterpolationMode.HAMMING: Image.HAMMING}


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    """An int resizes the shorter side to it (aspect kept, the longer side truncated as torchvision does); a pair
    gives (height, width)."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
        self.size, self.interpolation = size, interpolation or InterpolationMode.BILINEAR

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if isinstance(self.size, int) or len(self.size) == 1:
            short = self.size if isinstance(self.size, int) else self.size[0]
            if width <= height:
                new_w, new_h = short, int(short * height / width)
            else:
                new_w, new_h = int(short * width / height), short
        else:
            new_h, new_w = _pair(self.size)
        return image.resize((new_w, new_h), _PIL[self.interpolation])


class CenterCrop:
    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, image: Image.Image) -> Image.Image:
        height, width = self.size
        top = int(round((image.size[1] - height) / 2.0))
        left = int(round((image.size[0] - width) / 2.0))
        return functional.crop(image, top, left, height, width)


class RandomCrop:
    def __init__(self, size):
        self.size = _pair(size)

    @staticmethod
    def get_params(image: Image.Image, output_size) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random crop of ``output_size`` inside ``image``."""
        height, width = _pair(output_size)  # torch's RNG, as torchvision draws them (the script's seed covers it)
        top = int(torch.randint(0, image.size[1] - height + 1, size=(1,))) if image.size[1] > height else 0
        left = int(torch.randint(0, image.size[0] - width + 1, size=(1,))) if image.size[0] > width else 0
        return top, left, height, width

    def __call__(self, image: Image.Image) -> Image.Image:
        return functional.crop(image, *self.get_params(image, self.size))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < self.p else image


class ToTensor:
    """A PIL image as a float tensor in [0, 1], channels first."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().float().div(255)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
        return (tensor - mean) / std
