"""What a captioner answers: captions for a batch of decoded images."""

from __future__ import annotations

from abc import ABC, abstractmethod

from PIL import Image

# director-diffusion's captioning prompt.
DEFAULT_PROMPT = (
    "Describe this film still for training an image model on the director's visual style. Cover the lighting, "
    "composition, colour grading, camera technique and mood. Be concrete and use fewer than 75 words."
)


class Captioner(ABC):
    """Built from the caption command's options; called with batches of RGB images."""

    @abstractmethod
    def caption(self, images: list[Image.Image], names: list[str]) -> list[str]:
        """One caption (without trigger phrase) per image; ``names`` are the files' names."""
