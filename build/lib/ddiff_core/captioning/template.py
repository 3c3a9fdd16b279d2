"""A captioner that needs no model: a fixed text, or one built from the file name."""

from __future__ import annotations

import re
from pathlib import Path

from ddiff_core.captioning.base import Captioner


class TemplateCaptioner(Captioner):
    def __init__(self, *, text: str | None = None, **_):
        self.text = text

    def caption(self, images, names):
        if self.text:
            return [self.text for _ in names]
        # "blade_runner_0042.jpg" -> "blade runner" (numbers dropped)
        return [" ".join(w for w in re.split(r"[\W_]+", Path(n).stem) if w and not w.isdigit()) or "a film still"
                for n in names]
