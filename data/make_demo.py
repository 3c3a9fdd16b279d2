"""Rebuilds data/demo/ from scikit-image's bundled sample images (needs `pip install scikit-image`).

    python data/make_demo.py
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

# name -> (caption body, licence as stated in scikit-image's skimage/data/_fetchers.py)
SAMPLES = {
    "astronaut": ("a portrait of an astronaut in a white suit before a flag", "public domain (NASA)"),
    "camera": ("a photographer with a camera on a tripod, black and white", "CC0 (Lav Varshney)"),
    "brick": ("a close-up of a weathered brick wall", "CC0 (CC0Textures)"),
    "grass": ("a field of dense green grass seen from above", "CC0 (CC0Textures)"),
    "gravel": ("a bed of grey gravel under flat light", "CC0 (CC0Textures)"),
    "coins": ("old coins laid out in rows on a dark table", "no known copyright restrictions (Library of Congress)"),
    "chelsea": ("a tabby cat looking sideways at the camera", "CC0 (Stefan van der Walt)"),
    "coffee": ("a cup of coffee on a saucer seen from above", "CC0 (Rachel Michetti)"),
    "hubble_deep_field": ("a deep field of distant galaxies in space", "public domain (NASA)"),
    "rocket": ("a rocket on the launch pad against a blue sky", "public domain (SpaceX)"),
    "retina": ("a red retina photographed through a lens", "CC0 1.0"),
    "immunohistochemistry": ("stained tissue under a microscope, brown and blue", "no known copyright restrictions"),
}
TRIGGER = "<demo-style>"
SIDE = 128


def main() -> None:
    out = Path(__file__).parent / "demo"
    out.mkdir(exist_ok=True)
    rows, licences = [], []
    for name, (caption, licence) in SAMPLES.items():
        pixels = getattr(data, name)()
        image = Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((SIDE, SIDE), Image.Resampling.BICUBIC)
        image.save(out / f"{name}.jpg", quality=90)
        # director-diffusion's caption layout: "<tok> caption, in <tok> style"
        rows.append({"file_name": f"{name}.jpg", "text": f"{TRIGGER} {caption}, in {TRIGGER} style"})
        licences.append(f"| {name}.jpg | skimage.data.{name} | {licence} |")
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "LICENSES.md").write_text(
        "# Demo images\n\nCropped to a square and resized to 128 px from scikit-image's bundled samples "
        "(`python data/make_demo.py`).\n\n| file | source | licence |\n|---|---|---|\n" + "\n".join(licences) + "\n"
    )


if __name__ == "__main__":
    main()
