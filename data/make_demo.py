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
# Frames as they were shot: name -> (source sample, width/height, caption body); cut from the same licensed samples.
FRAMES = {
    "coffee_scope": ("coffee", 2.39, "a cup of coffee on a saucer in a wide anamorphic frame"),
    "rocket_flat": ("rocket", 1.85, "a rocket on the launch pad in a flat widescreen frame"),
    "hubble_wide": ("hubble_deep_field", 16 / 9, "distant galaxies across a wide frame"),
    "chelsea_portrait": ("chelsea", 2 / 3, "a tabby cat in a tall portrait frame"),
    "camera_portrait": ("camera", 9 / 16, "a photographer in a tall vertical frame, black and white"),
}
TRIGGER = "<demo-style>"
SIDE = 128
LONG_SIDE = 256  # the framed stills: long side in pixels


def _centre_cut(image: Image.Image, ratio: float) -> Image.Image:
    """The largest centred window of width/height ``ratio``."""
    width, height = image.size
    if width / height > ratio:
        width = round(height * ratio)
    else:
        height = round(width / ratio)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


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
    for name, (source, ratio, caption) in FRAMES.items():
        image = _centre_cut(Image.fromarray(getattr(data, source)().astype(np.uint8)).convert("RGB"), ratio)
        scale = LONG_SIDE / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        image.save(out / f"{name}.jpg", quality=90)
        rows.append({"file_name": f"{name}.jpg", "text": f"{TRIGGER} {caption}, in {TRIGGER} style"})
        licences.append(f"| {name}.jpg | skimage.data.{source}, cut to {ratio:.2f}:1 | {SAMPLES[source][1]} |")
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "LICENSES.md").write_text(
        "# Demo images\n\nFrom scikit-image's bundled samples (`python data/make_demo.py`): twelve cropped to a square "
        "and resized to 128 px, five cut to film and portrait frames (2.39:1, 1.85:1, 16:9, 2:3, 9:16) with a 256 px "
        "long side.\n\n| file | source | licence |\n|---|---|---|\n" + "\n".join(licences) + "\n"
    )


if __name__ == "__main__":
    main()
