"""Captioning a folder: resumable batches, safe decoding, trigger placement, metadata.jsonl rewritten atomically."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

from ddiff_core.data import IMAGE_SUFFIXES, BadImage, DataError, decode_image, read_metadata, write_metadata

logger = logging.getLogger(__name__)
TRIGGER_PLACEMENTS = ("start", "start_end", "none")


def place_trigger(caption: str, trigger: str | None, placement: str) -> str:
    """director-diffusion's reinforcement: ``<tok> caption, in <tok> style`` (start_end), or the trigger first."""
    if not trigger or placement == "none":
        return caption
    if placement == "start":
        return f"{trigger} {caption}"
    return f"{trigger} {caption}, in {trigger} style"


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
                   batch_size: int = 4, overwrite: bool = False, caption_column: str = "text",
                   show_progress: bool = True) -> dict:
    """Captions every image of ``folder`` lacking one (or all, with ``overwrite``) into ``folder/metadata.jsonl``.

    An image has a caption when its row holds a non-empty string in ``caption_column``. Every existing row is
    kept, in order, with every field; only ``caption_column`` of the captioned rows is set, and rows for newly
    captioned files are appended in file-name order. The file is rewritten atomically after every batch, so a
    killed run loses at most one batch and a re-run resumes.

    Returns:
        Counts: ``captioned``, ``skipped_existing`` and ``bad`` (a list of (name, reason)).

    Raises:
        DataError: the folder is missing or holds no images, or its metadata.jsonl cannot be read whole.
    """
    folder = Path(folder)
    files = list_images(folder)
    rows = read_metadata(folder)
    by_name = {row["file_name"]: row for row in rows}  # the last row of a name wins, as in training
    captioned = {name for name, row in by_name.items()
                 if isinstance(row.get(caption_column), str) and row[caption_column]}
    todo = [p for p in files if overwrite or p.name not in captioned]
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
                if name not in by_name:
                    by_name[name] = {"file_name": name}
                    rows.append(by_name[name])
                by_name[name][caption_column] = place_trigger(text, trigger, placement)
            write_metadata(folder, rows)
            result["captioned"] += len(names)
        progress.update(len(todo[start : start + batch_size]))
    progress.close()
    return result
