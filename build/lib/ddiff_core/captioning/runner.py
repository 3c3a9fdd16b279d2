"""Captioning a folder: resumable batches, safe decoding, trigger placement, metadata.jsonl rewritten atomically."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from ddiff_core.data import IMAGE_SUFFIXES, BadImage, DataError, decode_image

logger = logging.getLogger(__name__)
TRIGGER_PLACEMENTS = ("start", "start_end", "none")


def place_trigger(caption: str, trigger: str | None, placement: str) -> str:
    """director-diffusion's reinforcement: ``<tok> caption, in <tok> style`` (start_end), or the trigger first."""
    if not trigger or placement == "none":
        return caption
    if placement == "start":
        return f"{trigger} {caption}"
    return f"{trigger} {caption}, in {trigger} style"


def read_metadata(path: Path) -> dict[str, str]:
    """file_name -> text, from an existing metadata.jsonl (malformed lines are reported and ignored)."""
    captions = {}
    if path.is_file():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                row = json.loads(line)
                captions[row["file_name"]] = row["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                if line.strip():
                    logger.warning("%s line %d is not a caption row; it will be rewritten", path, number)
    return captions


def write_metadata(path: Path, captions: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for name in sorted(captions):
            f.write(json.dumps({"file_name": name, "text": captions[name]}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_images(folder: str | Path) -> list[Path]:
    """The images to caption, sorted.

    Raises:
        DataError: the folder is missing or holds no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--input_dir {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"--input_dir {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def caption_folder(folder: str | Path, captioner, *, trigger: str | None, placement: str = "start_end",
                   batch_size: int = 4, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Captions every image of ``folder`` lacking one (or all, with ``overwrite``) into ``folder/metadata.jsonl``.

    The file is rewritten after every batch, so a killed run loses at most one batch and a re-run resumes.
    Returns counts: ``captioned``, ``skipped_existing`` and ``bad`` (a list of (name, reason)).

    Raises:
        DataError: the folder is missing or holds no images.
    """
    folder = Path(folder)
    files = list_images(folder)
    metadata = folder / "metadata.jsonl"
    captions = read_metadata(metadata)
    todo = [p for p in files if overwrite or p.name not in captions]
    result = {"captioned": 0, "skipped_existing": len(files) - len(todo), "bad": []}
    progress = tqdm(total=len(todo), desc="captioning", unit="img", disable=not show_progress)
    for start in range(0, len(todo), batch_size):
        images, names = [], []
        for path in todo[start : start + batch_size]:
            try:
                images.append(decode_image(path))
                names.append(path.name)
            except BadImage as err:
                logger.warning("skipping %s: %s", path.name, err)
                result["bad"].append((path.name, str(err)))
        if images:
            for name, text in zip(names, captioner.caption(images, names)):
                captions[name] = place_trigger(text, trigger, placement)
            write_metadata(metadata, captions)
            result["captioned"] += len(names)
        progress.update(len(todo[start : start + batch_size]))
    progress.close()
    return result
