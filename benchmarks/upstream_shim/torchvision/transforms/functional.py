"""``crop`` on PIL images, as torchvision's (top, left, height, width)."""

from __future__ import annotations


def crop(image, top: int, left: int, height: int, width: int):
    return image.crop((left, top, left + width, top + height))
