"""Training data: caption sources, a safe image-decoding policy, the indexed dataset and its batch order.

Every item is addressed by its record index; caches key on it, so shuffling never pairs an image
with the wrong caption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ddiff_core.atomic import atomic_write_text

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# Well below Pillow's 89.5 MP bomb limit: a 40 MP RGB image is already 120 MB decoded, per dataloader worker.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


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
    size: tuple[int, int] | None = None  # (width, height) of the decoded RGB image, set by screen_records
    digest: str | None = None  # SHA-256 of the image's identity, set by screen_records; caches key on it


def decode_image(source, max_pixels: int | None = None) -> Image.Image:
    """Opens and fully decodes an image as 8-bit RGB, or raises BadImage with the reason.

    Applies EXIF orientation, takes the first frame of animations, composites transparency onto
    white, converts CMYK, palette and 16-bit images, and rejects decompression bombs before decoding.

    Args:
        source: a path, a binary file object or an opened ``PIL.Image``.
        max_pixels: reject images with more pixels than this, judged by the header, before decoding.
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x its pixel limit and raises above; reject both, cheaply.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = source if isinstance(source, Image.Image) else Image.open(source)
            _refuse_over_limit(image.size, max_pixels)  # from the header: nothing is decoded yet
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            image.load()
    except BadImage:
        raise
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


def _refuse_over_limit(size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise BadImage(f"{width}x{height} = {width * height / 1e6:.1f} MP is over --max_image_pixels {max_pixels}")


def _check_header(file, max_pixels: int | None) -> None:
    """Raises BadImage when the header of an image file says it is over ``max_pixels``; any other problem is
    left for decode_image to report."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            size = Image.open(file).size
    except Exception:  # not an image, a bomb, truncated: decode_image names it
        return
    _refuse_over_limit(size, max_pixels)


def _leads_outside(path: Path, folder: Path) -> bool:
    """A symlink whose target is not inside ``folder``: a shared data folder must not read files elsewhere."""
    return path.is_symlink() and not path.resolve().is_relative_to(folder.resolve())


def read_metadata(folder: Path, caption_column: str | None = None) -> list[dict]:
    """The rows of ``folder/metadata.jsonl`` in file order, each with every field it has; [] when there is none.

    Training and captioning both read through here, so they agree on what a valid file is.

    Args:
        folder: the data folder.
        caption_column: training's caption column: a value there that is present but not a string is an
            error. Captioning passes None: rows it does not caption are kept as they are, whatever their types.

    Raises:
        DataError: naming the file (and line): a symlink leading outside ``folder``, a line that is not UTF-8
            or not a JSON object with a string ``file_name``, or a caption that is not a string.
    """
    path = folder / "metadata.jsonl"
    if _leads_outside(path, folder):
        raise DataError(f"{path} is a symlink leading outside the data folder; refusing to read it")
    if not path.is_file():
        return []
    rows = []
    # Bytes, decoded line by line, so an encoding error names its line; utf-8-sig drops an editor's BOM.
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path} line {number} is not UTF-8 ({err.reason} at column {err.start + 1})") from err
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number} is not JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DataError(f"{path} line {number}: needs a JSON object with a string file_name")
        if caption_column is not None and caption_column in row and not isinstance(row[caption_column], str):
            shown = json.dumps(row[caption_column])[:40]
            raise DataError(f"{path} line {number}: column {caption_column!r} holds {shown}, not a string caption")
        rows.append(row)
    return rows


def write_metadata(folder: Path, rows: list[dict]) -> None:
    """Replaces ``folder/metadata.jsonl`` with ``rows`` atomically, one JSON object a line, fields in their order."""
    # ensure_ascii (the default) round-trips any string json.loads produced, lone surrogates included.
    atomic_write_text(folder / "metadata.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


def _folder_records(folder: Path, caption_column: str, instance_prompt: str | None) -> list[Record]:
    if not folder.is_dir():
        raise DataError(f"--instance_data_dir {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    rows = read_metadata(folder, caption_column)
    if rows and not any(caption_column in row for row in rows):  # a misspelt column must not fall back silently
        raise DataError(f"{folder / 'metadata.jsonl'}: no row has the column {caption_column!r} (--caption_column)")
    captions = {row["file_name"]: row[caption_column] for row in rows if caption_column in row}
    if not files:
        raise DataError(f"--instance_data_dir {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    records = []
    for path in files:
        caption = captions.get(path.name)
        sidecar = path.with_suffix(".txt")
        if not caption and sidecar.is_file():
            if _leads_outside(sidecar, folder):
                raise DataError(f"{sidecar} is a symlink leading outside the data folder; refusing to read it")
            caption = sidecar.read_text().strip()
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


def _screen_one(record: Record, dataset, image_column: str, max_pixels: int | None) -> Record:
    if record.path is None:
        image = decode_image(dataset[record.row][image_column], max_pixels)
        # datasets hands over decoded pixels, not the file: the identity is what training will see.
        digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode() + image.tobytes()).hexdigest()
        return dataclasses.replace(record, size=image.size, digest=digest)
    # Folders are not recursed, so an image's data folder is its parent.
    if _leads_outside(record.path, record.path.parent):
        raise BadImage("symlink leads outside the data folder")
    try:
        size = record.path.stat().st_size
        # No image under the pixel limit is larger than its uncompressed 16-bit RGBA form: never read such a file.
        if max_pixels is not None and size > 8 * max_pixels + (1 << 20):
            raise BadImage(f"the file is {size / 2**20:.0f} MiB, more than any image under --max_image_pixels")
        with open(record.path, "rb") as f:
            try:  # the size from the header first, so an over-large image is skipped before it is read whole
                _check_header(f, max_pixels)
            finally:
                f.seek(0)
            data = f.read()  # read once: hashed, then decoded from the same bytes
    except FileNotFoundError as err:
        raise BadImage("file not found") from err
    except OSError as err:
        raise BadImage(f"not readable ({err.strerror})") from err
    image = decode_image(io.BytesIO(data), max_pixels)
    return dataclasses.replace(record, size=image.size, digest=hashlib.sha256(data).hexdigest())


def screen_records(records: list[Record], dataset=None, image_column: str = "image",
                   max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[list[Record], list[tuple[str, str]]]:
    """Decodes every image once and keeps the usable ones.

    Args:
        records: from ``load_records``.
        dataset: the ``datasets.Dataset`` that ``--dataset_name`` records point into.
        image_column: its image column.
        max_pixels: ``--max_image_pixels``: larger images are skipped by their header, without decoding.

    Returns:
        The usable records, each with ``size`` (width, height after EXIF orientation) and ``digest`` (SHA-256
        of the file's bytes, or of a dataset row's decoded mode, size and pixels), and (name, reason) for each
        skipped one.
    """
    usable, skipped = [], []
    for record in records:
        try:
            usable.append(_screen_one(record, dataset, image_column, max_pixels))
        except BadImage as err:
            logger.warning("skipping %s: %s", record.name, err)
            skipped.append((record.name, str(err)))
    return usable, skipped


HOLDOUT_FILE = "holdout.jsonl"


def split_holdout(records: list[Record], holdout: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Keeps ``holdout`` images (a count, or a fraction of them when below 1; at least one) out of training.

    Which ones depends only on the seed and each image's content and name, not on the order of the folder, so a
    re-run or another machine holds out the same stills. Both lists keep the records' order.

    Raises:
        DataError: the holdout would leave no image to train on.
    """
    if not holdout:
        return records, []
    count = int(holdout) if holdout >= 1 else max(1, round(holdout * len(records)))
    if count >= len(records):
        raise DataError(f"--holdout {holdout:g} keeps {count} of {len(records)} usable images out of training: "
                        "none would be left to train on")
    rank = sorted(range(len(records)),
                  key=lambda i: hashlib.sha256(f"{seed}:{records[i].digest}:{records[i].name}".encode()).hexdigest())
    held = set(rank[:count])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def write_holdout(path: Path, records: list[Record]) -> Path:
    """``holdout.jsonl``: one line per held-out image (its name, caption and content digest)."""
    lines = [json.dumps({"file_name": r.name, "text": r.caption, "sha256": r.digest}) for r in records]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_holdout(path: Path, limit: int = 1 << 20) -> list[dict]:
    """The entries of a ``holdout.jsonl`` (at most ``limit`` bytes; each must name a digest).

    Raises:
        DataError: a missing, oversized or malformed file.
    """
    path = Path(path)
    if path.is_symlink():
        raise DataError(f"{path} is a symlink; only a plain holdout.jsonl is read")
    if not path.is_file():
        raise DataError(f"{path} does not exist (train with --holdout N to hold out stills)")
    if path.stat().st_size > limit:
        raise DataError(f"{path} is larger than {limit} bytes")
    entries = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError as err:
            raise DataError(f"{path} line {number} is not JSON") from err
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("file_name"), str)):
            raise DataError(f"{path} line {number} lacks file_name or sha256")
        entries.append(entry)
    return entries


def _item_rng(seed: int, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class Crop:
    """Where one training image comes from in its source: resized to ``resized`` (w, h), then the (height, width)
    window at (left, top) is cut, then flipped or not."""

    resized: tuple[int, int]
    left: int
    top: int
    flip: bool
    height: int
    width: int


def plan_crop(size: tuple[int, int], target: tuple[int, int], center_crop: bool, random_flip: bool,
              rng: np.random.Generator) -> Crop:
    """Resize a ``size`` (w, h) image to cover a ``target`` (height, width) frame and pick the window (and a flip).

    Depends only on the size and the seeded ``rng``, so the geometry is known without decoding the pixels (SDXL is
    conditioned on it, cached or not).
    """
    height, width = target
    flip = random_flip and bool(rng.integers(0, 2))
    scale = max(width / size[0], height / size[1])
    resized = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    if center_crop:
        left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    else:
        left = int(rng.integers(0, resized[0] - width + 1))
        top = int(rng.integers(0, resized[1] - height + 1))
    return Crop(resized, left, top, flip, height, width)


def image_to_tensor(image: Image.Image, crop: Crop) -> torch.Tensor:
    """Resize, crop and flip as planned; returns CHW in [-1, 1]."""
    image = image.resize(crop.resized, Image.Resampling.BILINEAR)
    image = image.crop((crop.left, crop.top, crop.left + crop.width, crop.top + crop.height))
    if crop.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Records as training items, each in its own frame: a square of ``resolution`` or, with ``targets``, each
    record's bucket (height, width). Crops and flips are fixed per record (seeded), so a cached latent and a freshly
    encoded one are the same image."""

    def __init__(self, records: list[Record], *, resolution: int, center_crop: bool = False, random_flip: bool = False,
                 seed: int = 0, repeats: int = 1, dataset=None, image_column: str = "image", with_pixels: bool = True,
                 targets: list[tuple[int, int]] | None = None):
        self.records = records
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.repeats = seed, repeats
        self.dataset, self.image_column = dataset, image_column
        self.with_pixels = with_pixels
        self.targets = [tuple(t) for t in targets] if targets else [(resolution, resolution)] * len(records)

    @property
    def num_records(self) -> int:
        return len(self.records)

    def __len__(self) -> int:
        return len(self.records) * self.repeats

    def record_index(self, index: int) -> int:
        return index % len(self.records)

    def _decode(self, record: Record) -> Image.Image:
        return decode_image(record.path if record.path is not None else self.dataset[record.row][self.image_column])

    def _size(self, record_index: int) -> tuple[int, int]:
        return self.records[record_index].size or self._decode(self.records[record_index]).size

    def crop(self, record_index: int, size: tuple[int, int] | None = None) -> Crop:
        """The record's crop plan; from its screened size, without decoding."""
        rng = _item_rng(self.seed, record_index)
        return plan_crop(size or self._size(record_index), self.targets[record_index], self.center_crop,
                         self.random_flip, rng)

    def pixels(self, record_index: int) -> torch.Tensor:
        image = self._decode(self.records[record_index])
        return image_to_tensor(image, self.crop(record_index, image.size))

    def geometry(self, record_index: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((original height, width), (crop top, left)) in pixels: SDXL's size micro-conditioning."""
        width, height = self._size(record_index)
        crop = self.crop(record_index, (width, height))
        # A flipped crop starts, in the flipped image the model sees, as far from the left as it ended from the right.
        left = crop.resized[0] - crop.width - crop.left if crop.flip else crop.left
        return (height, width), (crop.top, left)

    def __getitem__(self, index: int) -> dict:
        record_index = self.record_index(index)
        original, crop_top_left = self.geometry(record_index)
        item = {"index": record_index, "caption": self.records[record_index].caption, "original_size": original,
                "crop_top_left": crop_top_left}
        if self.with_pixels:
            item["pixels"] = self.pixels(record_index)
        return item

def collate(items: list[dict]) -> dict:
    batch = {"indices": torch.tensor([i["index"] for i in items]), "captions": [i["caption"] for i in items],
             "conditioning": {"original_size": torch.tensor([i["original_size"] for i in items]),
                              "crop_top_left": torch.tensor([i["crop_top_left"] for i in items])}}
    if "pixels" in items[0]:
        batch["pixels"] = torch.stack([i["pixels"] for i in items])
    return batch


class EpochBatchSampler(torch.utils.data.Sampler):
    """Seeded per-epoch batches, each from one group (an aspect bucket), split across processes, resumable at any
    batch.

    Epoch ``e`` draws from ``seed + e``: within each group a permutation of its items, cut into batches, the last one
    filled up by repeating the group's first items of that epoch (no image is dropped, and every batch has one shape
    and the full size, cached or not); then, with several groups, the batches in a shuffled order. Process ``r`` of
    ``n`` takes batches ``r, r + n, ...``; the last round is filled up with the epoch's first batches, so every process
    runs the same number, a resumed run can skip exactly the batches already trained on, and no process waits at a
    collective.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int, num_replicas: int = 1, rank: int = 0,
                 groups: list[int] | None = None):
        self.batch_size, self.seed = batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.skip = 0, 0
        self.members: dict[int, list[int]] = {}
        for item, group in enumerate(groups if groups is not None else [0] * num_items):
            self.members.setdefault(group, []).append(item)
        self.num_batches = sum(math.ceil(len(m) / batch_size) for m in self.members.values())
        if self.num_batches == 0:
            raise DataError("no training items to make a batch of")

    def batches_per_replica(self) -> int:
        return math.ceil(self.num_batches / self.num_replicas)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def epoch_batches(self) -> list[list[int]]:
        """Every batch of this epoch, for all processes, in order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for group in sorted(self.members):
            items = self.members[group]
            order = [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                batches.append(batch + [order[i % len(order)] for i in range(self.batch_size - len(batch))])
        if len(self.members) > 1:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        # Every process gets as many batches as the others: the last round is filled up with the epoch's first batches.
        return batches + batches[: self.batches_per_replica() * self.num_replicas - len(batches)]

    def __iter__(self):
        yield from self.epoch_batches()[self.rank :: self.num_replicas][self.skip :]

    def __len__(self) -> int:
        return self.batches_per_replica() - self.skip
