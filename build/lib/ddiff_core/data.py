"""Training data: caption sources, a safe image-decoding policy, the indexed dataset and its batch order.

Every item is addressed by its record index; caches key on it, so shuffling never pairs an image
with the wrong caption.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


class DataError(ValueError):
    """The training data cannot be used; the message names the folder or file."""


class BadImage(ValueError):
    """One file that is not a usable image; the message is the reason."""


@dataclass(frozen=True)
class Record:
    """One training example: where its image comes from and its caption."""

    name: str  # file name (folders) or "row N" (datasets), for messages and reports
    caption: str
    path: Path | None = None
    row: int | None = None  # row in a datasets.Dataset


def decode_image(source) -> Image.Image:
    """Opens and fully decodes an image as 8-bit RGB, or raises BadImage with the reason.

    Applies EXIF orientation, takes the first frame of animations, composites transparency onto
    white, converts CMYK, palette and 16-bit images, and rejects decompression bombs before decoding.
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x its pixel limit and raises above; reject both, cheaply.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = source if isinstance(source, Image.Image) else Image.open(source)
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"decompression bomb ({err})") from err
    except FileNotFoundError as err:
        raise BadImage("file not found") from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated, zero bytes, not an image
        raise BadImage(f"not a readable image ({type(err).__name__}: {err})") from err
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def _folder_records(folder: Path, caption_column: str, instance_prompt: str | None) -> list[Record]:
    if not folder.is_dir():
        raise DataError(f"--instance_data_dir {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    metadata = folder / "metadata.jsonl"
    captions: dict[str, str] = {}
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[row["file_name"]] = row[caption_column]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{metadata} line {number}: needs JSON with file_name and {caption_column} ({err})") from err
    if not files:
        raise DataError(f"--instance_data_dir {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    records = []
    for path in files:
        caption = captions.get(path.name)
        if caption is None and path.with_suffix(".txt").is_file():
            caption = path.with_suffix(".txt").read_text().strip()
        if not caption:
            caption = instance_prompt
        if not caption:
            missing = sum(1 for p in files if not captions.get(p.name) and not p.with_suffix(".txt").is_file())
            raise DataError(
                f"{path} has no caption ({missing} of {len(files)} images lack one): add metadata.jsonl or .txt "
                "captions, or pass --instance_prompt"
            )
        records.append(Record(name=path.name, caption=caption, path=path))
    return records


def load_records(config) -> tuple[list[Record], object | None]:
    """Reads captions and image locations (no pixel decoding) from the configured source.

    Returns:
        The records and, for ``--dataset_name``, the ``datasets.Dataset`` their rows point into.

    Raises:
        DataError: a missing or empty source, or an image without a caption and no ``--instance_prompt``.
    """
    if config.instance_data_dir:
        return _folder_records(Path(config.instance_data_dir), config.caption_column or "text", config.instance_prompt), None
    import datasets

    try:
        dataset = datasets.load_dataset(
            config.dataset_name, config.dataset_config_name, cache_dir=config.cache_dir, split="train"
        )
    except Exception as err:  # datasets raises many types for a bad name or folder
        raise DataError(f"--dataset_name {config.dataset_name} could not be loaded: {str(err).splitlines()[0]}") from err
    if config.image_column not in dataset.column_names:
        raise DataError(f"--image_column {config.image_column!r} is not a column of {config.dataset_name} ({dataset.column_names})")
    if config.caption_column and config.caption_column not in dataset.column_names:
        raise DataError(f"--caption_column {config.caption_column!r} is not a column of {config.dataset_name} ({dataset.column_names})")
    if len(dataset) == 0:
        raise DataError(f"--dataset_name {config.dataset_name} has no rows")
    captions = dataset[config.caption_column] if config.caption_column else [None] * len(dataset)
    records = []
    for row, caption in enumerate(captions):
        caption = caption or config.instance_prompt
        if not caption:
            raise DataError(f"{config.dataset_name} row {row} has no caption: pass --caption_column or --instance_prompt")
        records.append(Record(name=f"row {row}", caption=caption, row=row))
    return records, dataset


def screen_records(records: list[Record], dataset=None, image_column: str = "image") -> tuple[list[Record], list[tuple[str, str]]]:
    """Decodes every image once; returns the usable records and (name, reason) for each skipped one."""
    usable, skipped = [], []
    for record in records:
        try:
            decode_image(record.path if record.path is not None else dataset[record.row][image_column])
        except BadImage as err:
            logger.warning("skipping %s: %s", record.name, err)
            skipped.append((record.name, str(err)))
            continue
        usable.append(record)
    return usable, skipped


def _item_rng(seed: int, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def image_to_tensor(image: Image.Image, resolution: int, center_crop: bool, flip: bool, rng: np.random.Generator) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop a square, optionally flip; returns CHW in [-1, 1]."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    if center_crop:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        left = int(rng.integers(0, image.width - resolution + 1))
        top = int(rng.integers(0, image.height - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Records as training items. Crops and flips are fixed per record (seeded), so a cached latent
    and a freshly encoded one are the same image."""

    def __init__(self, records: list[Record], *, resolution: int, center_crop: bool = False, random_flip: bool = False,
                 seed: int = 0, repeats: int = 1, dataset=None, image_column: str = "image", with_pixels: bool = True):
        self.records = records
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.repeats = seed, repeats
        self.dataset, self.image_column = dataset, image_column
        self.with_pixels = with_pixels

    @property
    def num_records(self) -> int:
        return len(self.records)

    def __len__(self) -> int:
        return len(self.records) * self.repeats

    def pixels(self, record_index: int) -> torch.Tensor:
        record = self.records[record_index]
        image = decode_image(record.path if record.path is not None else self.dataset[record.row][self.image_column])
        rng = _item_rng(self.seed, record_index)
        flip = self.random_flip and bool(rng.integers(0, 2))
        return image_to_tensor(image, self.resolution, self.center_crop, flip, rng)

    def __getitem__(self, index: int) -> dict:
        record_index = index % len(self.records)
        item = {"index": record_index, "caption": self.records[record_index].caption}
        if self.with_pixels:
            item["pixels"] = self.pixels(record_index)
        return item


def collate(items: list[dict]) -> dict:
    batch = {"indices": torch.tensor([i["index"] for i in items]), "captions": [i["caption"] for i in items]}
    if "pixels" in items[0]:
        batch["pixels"] = torch.stack([i["pixels"] for i in items])
    return batch


class EpochBatchSampler(torch.utils.data.Sampler):
    """Seeded per-epoch shuffle, split across processes, resumable at any batch.

    Epoch ``e`` is a permutation drawn from ``seed + e``; process ``r`` of ``n`` takes batches
    ``r, r + n, ...``, so every process sees the same number of batches (the last partial round is
    dropped) and a resumed run can skip exactly the batches already trained on.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int, num_replicas: int = 1, rank: int = 0):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.skip = 0, 0
        if self.batches_per_replica() == 0:
            raise DataError(
                f"{num_items} training items cannot fill one batch of {batch_size} on each of {num_replicas} processes"
            )

    def batches_per_replica(self) -> int:
        return math.ceil(self.num_items / self.batch_size) // self.num_replicas

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        batches = [order[i : i + self.batch_size] for i in range(0, self.num_items, self.batch_size)]
        mine = batches[self.rank :: self.num_replicas][: self.batches_per_replica()]
        yield from mine[self.skip :]

    def __len__(self) -> int:
        return self.batches_per_replica() - self.skip
