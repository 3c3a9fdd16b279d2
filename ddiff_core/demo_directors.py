"""Three demo "directors" made from the shipped stills, each with a colour grade of its own, so a launch of many runs
and the evaluation have data whose styles really differ (offline, in a second):

    python -m ddiff_core.demo_directors --output_dir data/directors

``teal`` grades teal shadows and orange highlights, ``pastel`` lifts and warms, ``noir`` is high-contrast black and
white. Each folder gets the stills and a ``metadata.jsonl`` whose captions carry the director's trigger, e.g.
``<noir-style>``; ``configs/directors.yaml`` trains all three in one launch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ddiff_core.atomic import atomic_write, atomic_write_text

DEMO_DATA = Path(__file__).resolve().parents[1] / "data" / "demo"


def _teal(x: np.ndarray) -> np.ndarray:
    luma = x.mean(axis=2, keepdims=True)
    shadows, highlights = (1 - luma) ** 2, luma ** 2
    return x + shadows * np.array([-0.25, 0.1, 0.2]) + highlights * np.array([0.2, 0.05, -0.2])


def _pastel(x: np.ndarray) -> np.ndarray:
    return 0.35 + 0.6 * (x * np.array([1.0, 0.92, 0.85]) + 0.08)


def _noir(x: np.ndarray) -> np.ndarray:
    luma = (x * np.array([0.3, 0.59, 0.11])).sum(axis=2, keepdims=True)
    return np.repeat(1 / (1 + np.exp(-10 * (luma - 0.5))), 3, axis=2)


GRADES = {"teal": _teal, "pastel": _pastel, "noir": _noir}


def grade(image: Image.Image, name: str) -> Image.Image:
    x = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return Image.fromarray((np.clip(GRADES[name](x), 0, 1) * 255).round().astype(np.uint8))


def make_directors(output_dir: Path, source: Path = DEMO_DATA, names=tuple(GRADES)) -> dict[str, Path]:
    """Writes one graded copy of ``source``'s stills per name; returns each director's folder."""
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines() if line.strip()]
    folders = {}
    for name in names:
        folder = Path(output_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for row in rows:
            with Image.open(source / row["file_name"]) as image:
                graded = grade(image, name)
            atomic_write(folder / row["file_name"], lambda tmp: graded.save(tmp, format="JPEG", quality=92))
            caption = row["text"].replace("<demo-style>", f"<{name}-style>")
            lines.append(json.dumps({"file_name": row["file_name"], "text": caption}))
        atomic_write_text(folder / "metadata.jsonl", "\n".join(lines) + "\n")
        folders[name] = folder
    return folders


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="data/directors")
    args = parser.parse_args(argv)
    for name, folder in make_directors(Path(args.output_dir)).items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
