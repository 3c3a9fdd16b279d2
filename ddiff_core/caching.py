"""Latent and text-embedding caches: computed once per record, keyed by record index, fingerprinted, on disk.

A cache file is named by a fingerprint of everything its values depend on (model, data, resolution,
settings); a later run with the same fingerprint reuses it, any change builds a new one.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ddiff_core.atomic import atomic_write
from ddiff_core.speed import to_device

logger = logging.getLogger(__name__)

CACHE_FORMAT = 3  # 2: keyed by image content digests; 3: one row per record (each latent in its own frame)


def fingerprint(payload: dict) -> str:
    """A short stable hash of a JSON-able description."""
    blob = json.dumps({"format": CACHE_FORMAT, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


class FeatureCache:
    """Named rows, one per record (a latent keeps its own bucket's shape), looked up by record index."""

    def __init__(self, rows: dict[str, list[torch.Tensor]], path: Path | None = None, reused: bool = False):
        self.rows, self.path, self.reused = rows, path, reused

    def __len__(self) -> int:
        return len(next(iter(self.rows.values())))

    def lookup(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows of ``indices`` stacked (a batch holds one bucket, so its rows share a shape)."""
        return {name: torch.stack([rows[i] for i in indices.tolist()]) for name, rows in self.rows.items()}

    @classmethod
    def load_or_build(
        cls, path: Path, key: str, num_records: int, build: Callable[[], dict[str, list[torch.Tensor]]]
    ) -> "FeatureCache":
        """Loads ``path`` when it holds this fingerprint ``key`` for ``num_records`` records; else builds and saves it."""
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("fingerprint") == key and int(meta.get("num_records", -1)) == num_records:
                        rows: dict[str, list] = {}
                        for stored in sorted(f.keys()):
                            name, _, index = stored.rpartition(".")
                            rows.setdefault(name, [None] * num_records)[int(index)] = f.get_tensor(stored)
                        if rows and all(r is not None for values in rows.values() for r in values):
                            return cls(rows, path, reused=True)
                logger.warning("cache %s does not match this run; rebuilding it", path)
            except Exception as err:  # a corrupt cache is rebuilt, never trusted
                logger.warning("cache %s is unreadable (%s); rebuilding it", path, err)
        rows = build()
        for name, values in rows.items():
            if len(values) != num_records:
                raise RuntimeError(f"cache {name} has {len(values)} rows for {num_records} records")
        tensors = {f"{name}.{i:06d}": value for name, values in rows.items() for i, value in enumerate(values)}
        _atomic_save(tensors, path, {"fingerprint": key, "num_records": str(num_records)})
        return cls(rows, path)


def _batched(indices: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def build_latent_cache(family, vae, dataset, path: Path, key: str, batch_size: int = 4, show_progress: bool = True) -> FeatureCache:
    """VAE latent distributions (raw ``[mean, logvar]``) for every record, encoded once, each in its own frame."""

    def build():
        rows: list[torch.Tensor | None] = [None] * dataset.num_records
        by_frame: dict[tuple, list[int]] = {}
        for i in range(dataset.num_records):  # records of one frame encode together
            by_frame.setdefault(dataset.targets[i], []).append(i)
        chunks = [chunk for indices in by_frame.values() for chunk in _batched(indices, batch_size)]
        for chunk in tqdm(chunks, desc="caching latents", disable=not show_progress):
            pixels = torch.stack([dataset.pixels(i) for i in chunk])
            for i, params in zip(chunk, family.encode_images(vae, pixels).float().cpu()):
                rows[i] = params.clone()
        return {"latent_dist": rows}

    return FeatureCache.load_or_build(path, key, dataset.num_records, build)


def build_text_cache(family, components, captions: list[str], path: Path, key: str, *, device, max_sequence_length: int,
                     batch_size: int = 8, show_progress: bool = True) -> FeatureCache:
    """Text embeddings for every record; each distinct caption is encoded once."""

    def build():
        unique = list(dict.fromkeys(captions))
        encoded: dict[str, list[torch.Tensor]] = {}
        for chunk in tqdm(list(_batched(unique, batch_size)), desc="caching text embeddings", disable=not show_progress):
            out = family.encode_prompts(components, chunk, device=device, max_sequence_length=max_sequence_length)
            for name, value in out.items():
                encoded.setdefault(name, []).append(value.cpu())
        position = {caption: i for i, caption in enumerate(unique)}
        tables = {name: torch.cat(parts) for name, parts in encoded.items()}
        return {name: [table[position[c]].clone() for c in captions] for name, table in tables.items()}

    return FeatureCache.load_or_build(path, key, len(captions), build)


class TrainingFeatures:
    """What one batch trains on: latent parameters and text embeddings, from a cache or computed now.

    The loop asks this object; whether a cache exists is its business, not the loop's. Cached rows stay in host memory
    and are copied to the device without blocking (``to_device``).
    """

    def __init__(self, family, components, *, device, max_sequence_length: int,
                 latent_cache: FeatureCache | None = None, text_cache: FeatureCache | None = None):
        self.family, self.components, self.device = family, components, torch.device(device)
        self.max_sequence_length = max_sequence_length
        self.latent_cache, self.text_cache = latent_cache, text_cache

    def latent_params(self, batch: dict) -> torch.Tensor:
        if self.latent_cache is not None:
            return to_device(self.latent_cache.lookup(batch["indices"])["latent_dist"], self.device)
        return self.family.encode_images(self.components["vae"], batch["pixels"].to(self.device)).float()

    def text_embeds(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.text_cache is not None:
            return {k: to_device(v, self.device) for k, v in self.text_cache.lookup(batch["indices"]).items()}
        return self.family.encode_prompts(
            self.components, batch["captions"], device=self.device, max_sequence_length=self.max_sequence_length
        )


def build_training_features(family, components: dict, dataset, records, *, cache_latents: bool, cache_text: bool,
                            cache_dir: Path, model_id: str, dtype: torch.dtype, seed: int, device,
                            max_sequence_length: int, show_progress: bool = True) -> TrainingFeatures:
    """Builds (or finds) the caches a run asked for and returns what the loop reads each batch from.

    What each cache depends on is decided here: latents on the family, model, dtype, each image's content and the
    crop settings (the seed only where crops or flips are random); text embeddings on the family, model, dtype,
    the captions and the sequence length. Nothing is freed: see :func:`release_covered_encoders`.
    """
    latent_cache = text_cache = None
    if cache_latents:
        random_crops = dataset.random_flip or not dataset.center_crop
        key = fingerprint({"kind": "latents", "family": family.name, "model": model_id, "dtype": str(dtype),
                           "data": [r.digest for r in records], "frames": dataset.targets,
                           "center_crop": dataset.center_crop, "random_flip": dataset.random_flip,
                           "seed": seed if random_crops else None})
        latent_cache = build_latent_cache(family, components["vae"], dataset, cache_dir / f"latents-{key}.safetensors",
                                          key, show_progress=show_progress)
    if cache_text:
        captions = [r.caption for r in records]
        key = fingerprint({"kind": "text", "family": family.name, "model": model_id, "dtype": str(dtype),
                           "captions": captions, "max_sequence_length": max_sequence_length})
        text_cache = build_text_cache(family, components, captions, cache_dir / f"text-{key}.safetensors", key,
                                      device=device, max_sequence_length=max_sequence_length,
                                      show_progress=show_progress)
    return TrainingFeatures(family, components, device=device, max_sequence_length=max_sequence_length,
                            latent_cache=latent_cache, text_cache=text_cache)


def release_covered_encoders(features: TrainingFeatures | list[TrainingFeatures], *, keep_vae: bool = False) -> list[str]:
    """Frees the encoders the caches cover (the training step never touches them again); ``keep_vae`` when
    validation still decodes with it. With several runs' features over one base, an encoder is freed only when
    every run's cache covers it. Returns the names freed."""
    runs = features if isinstance(features, list) else [features]
    components, family, freed = runs[0].components, runs[0].family, []
    if all(f.latent_cache is not None for f in runs) and not keep_vae:
        freed.append("vae")
    if all(f.text_cache is not None for f in runs):
        freed += [name for name in family.text_encoder_names]
    for name in freed:
        components[name] = None
    if freed:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return freed
