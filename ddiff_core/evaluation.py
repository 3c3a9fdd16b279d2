"""Did each LoRA learn its director? Base and LoRA images from one pipeline, scored with CLIP.

For every LoRA folder: a fixed prompt set x seeds, generated with the adapter off (base) and on (LoRA), batched, from
one pipeline holding every LoRA as a named adapter (as the serve page does). Then, with a CLIP model:

- prompt adherence: image-text cosine similarity (a style LoRA should not lose the prompt);
- style similarity: cosine similarity of each image to the centroid of the director's reference stills (the run's
  held-out stills, or a reference folder);
- style identification: the share of a LoRA's images whose nearest director centroid is its own, as a confusion
  matrix; the base images of the same prompts give the chance level.

Each LoRA's images and embeddings are written to ``eval/<name>/`` and reused by a re-run with the same settings, so
an interrupted evaluation resumes per LoRA. Every number is a function of the files and the settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from ddiff_core.atomic import atomic_write, atomic_write_text
from ddiff_core.caching import fingerprint
from ddiff_core.checkpoint import file_sha256, regular_file
from ddiff_core.config import ConfigError, TrainConfig, _coerce_all, load_yaml_mapping
from ddiff_core.data import HOLDOUT_FILE, BadImage, DataError, decode_image, load_records, read_holdout, screen_records
from ddiff_core.lora import EMA_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from ddiff_core.serving.adapters import AdapterBank, LoraInfo, StaticCatalog, lora_info, scan_lora_dir
from ddiff_core.validation import image_grid

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MAX_PROMPTS, MAX_SEEDS, MAX_REFERENCES = 256, 64, 2000
MAX_CONFIG_BYTES = 1 << 20
EVAL_FORMAT = 1


class EvalError(ValueError):
    """Bad input to the evaluation; one line naming it."""


# -- metrics (plain functions over L2-normalised embeddings) ----------------------------------------------------------
def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def centroid(embeddings: torch.Tensor) -> torch.Tensor:
    """The normalised mean direction of a set of embeddings."""
    return normalize(normalize(embeddings).mean(dim=0))


def cosine_to(embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each row's cosine similarity to ``target`` (one vector), or row-wise to ``target`` rows of the same count."""
    a = normalize(embeddings)
    b = normalize(target)
    return a @ b if b.ndim == 1 else (a * b).sum(dim=-1)


def nearest_centroid(embeddings: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The index of the nearest centroid (highest cosine) for each row."""
    return (normalize(embeddings) @ normalize(centroids).T).argmax(dim=1)


def confusion_matrix(true: list[int], predicted: list[int], classes: int) -> list[list[int]]:
    """counts[i][j]: images of class i assigned to class j."""
    counts = [[0] * classes for _ in range(classes)]
    for t, p in zip(true, predicted):
        counts[t][p] += 1
    return counts


def plain_prompt(prompt: str) -> str:
    """The prompt without trigger tokens such as ``<noir-style>`` (CLIP knows none of them)."""
    return " ".join(re.sub(r"<[^<>\s]+>", " ", prompt).replace(" ,", ",").split())


# -- CLIP -----------------------------------------------------------------------------------------------------------
class ClipScorer:
    """Image and text embeddings of a CLIP model (a hub id or a local folder), normalised, batched."""

    def __init__(self, name_or_path: str, device, batch_size: int = 16):
        from transformers import AutoTokenizer, CLIPModel

        try:  # the PIL processor: the default one wants torchvision
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        except ImportError:
            from transformers import CLIPImageProcessor

        try:
            self.model = CLIPModel.from_pretrained(name_or_path, use_safetensors=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.processor = CLIPImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise EvalError(f"--clip_model {name_or_path} could not be loaded: {str(err).splitlines()[0][:200]}") from err
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[i : i + self.batch_size], return_tensors="pt")["pixel_values"]
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return normalize(torch.cat(out))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True, return_tensors="pt")
            pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return normalize(torch.cat(out))


# -- inputs ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSettings:
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    resolution: int | None = None  # square side; None: each run's --resolution
    prompts: tuple[str, ...] | None = None  # None: each run's validation prompts
    max_sequence_length: int | None = None  # None: each run's
    batch_size: int = 8  # images per pipeline call


def read_prompts(path: Path) -> tuple[str, ...]:
    """One prompt per line (blank lines and ``#`` comments skipped); ``{trigger}`` becomes each LoRA's trigger."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
        raise EvalError(f"--prompts_file {path} does not exist or is larger than 1 MiB")
    prompts = tuple(line.strip() for line in path.read_text(errors="replace").splitlines()
                    if line.strip() and not line.lstrip().startswith("#"))
    if not prompts or len(prompts) > MAX_PROMPTS or any(len(p) > 1000 for p in prompts):
        raise EvalError(f"--prompts_file {path} must hold 1 to {MAX_PROMPTS} prompts of at most 1000 characters")
    return prompts


# What the evaluation takes from a run's training_config.yaml (a LoRA folder may come from someone else): the base
# model, where its data is, and its prompts and sizes, each bounded; nothing else.
CONFIG_KEYS = ("pretrained_model_name_or_path", "model_family", "instance_data_dir", "dataset_name",
               "dataset_config_name", "image_column", "caption_column", "instance_prompt", "resolution",
               "max_sequence_length", "validation_prompt", "max_image_pixels")
MAX_RESOLUTION, MAX_REFERENCE_PIXELS, REFERENCE_SIDE = 2048, 40_000_000, 512


def read_run_config(folder: Path) -> TrainConfig:
    """The parts of a run's ``training_config.yaml`` the evaluation uses, read as strictly as ``--config`` and
    bounded: a square of at most 2048 px, at most 512 text tokens, at most 256 prompts, a 40 MP image limit, and
    data from a local folder only (no download).

    Raises:
        EvalError: a missing, oversized or malformed file, or a value out of bounds.
    """
    path = folder / "training_config.yaml"
    if path.is_symlink():
        raise EvalError(f"{path} is a symlink; only plain files in a LoRA folder are read")
    if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
        raise EvalError(f"{path} is missing or larger than 1 MiB (not a finished ddiff run?)")
    try:
        loaded = load_yaml_mapping(path.read_text(errors="replace"), str(path))
        # Known keys with values only; a dataset named there is never loaded (it could name any folder or a download).
        values = _coerce_all({k: v for k, v in loaded.items() if k in CONFIG_KEYS and v is not None
                              and k not in ("dataset_name", "dataset_config_name")}, str(path))
    except ConfigError as err:
        raise EvalError(str(err)) from err
    config = TrainConfig(**values)
    config.max_image_pixels = min(config.max_image_pixels, MAX_REFERENCE_PIXELS)
    prompts = config.validation_prompts
    if not 16 <= config.resolution <= MAX_RESOLUTION or not (config.max_sequence_length is None or 1 <= config.max_sequence_length <= 512):
        raise EvalError(f"{path}: resolution or max_sequence_length out of bounds")
    if len(prompts) > MAX_PROMPTS or any(len(p) > 1000 for p in prompts):
        raise EvalError(f"{path}: more than {MAX_PROMPTS} validation prompts, or one over 1000 characters")
    return config


def _small(image: Image.Image) -> Image.Image:
    """A reference kept at CLIP's scale, not its own: 2000 stills of 40 MP would not fit in memory."""
    image.thumbnail((REFERENCE_SIDE, REFERENCE_SIDE), Image.Resampling.BICUBIC)
    return image


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not p.is_symlink())
    return files[:MAX_REFERENCES]


def reference_images(run: LoraInfo, config: TrainConfig, reference_dir: Path | None) -> tuple[list[Image.Image], str]:
    """The director's reference stills and where they came from: ``reference_dir/<name>/`` (or ``reference_dir``
    itself when it holds images), else the run's held-out stills (found in its training data by content digest).

    Raises:
        EvalError: no reference stills.
    """
    max_pixels = config.max_image_pixels
    if reference_dir is not None:
        if not reference_dir.is_dir():
            raise EvalError(f"--reference_dir {reference_dir} is not a folder")
        folder = reference_dir / run.name if (reference_dir / run.name).is_dir() else reference_dir
        images = []
        for path in _image_files(folder):
            try:
                images.append(_small(decode_image(path, max_pixels)))
            except BadImage as err:
                logger.warning("skipping reference %s: %s", path.name, err)
        if not images:
            looked = f"{folder} (no sub-folder {run.name}/ there)" if folder == reference_dir else str(folder)
            raise EvalError(f"no usable reference images in {looked}")
        return images, str(folder)
    entries = read_holdout(run.path / HOLDOUT_FILE) if (run.path / HOLDOUT_FILE).is_file() else []
    if not entries or not config.instance_data_dir:
        raise EvalError(f"{run.name}: no reference stills; train with --holdout N on an --instance_data_dir folder, "
                        "or pass --reference_dir")
    wanted = {e["sha256"] for e in entries}
    try:
        records, dataset = load_records(config)
    except DataError as err:
        raise EvalError(f"{run.name}: its training data cannot be read for the held-out stills ({err})") from err
    by_name = [r for r in records if r.name in {e["file_name"] for e in entries}]
    screened, _ = screen_records(by_name, dataset, config.image_column, max_pixels=max_pixels)
    held = [r for r in screened if r.digest in wanted]
    if len(held) < len(wanted):
        logger.warning("%s: %d of %d held-out stills found unchanged in %s", run.name, len(held), len(wanted),
                       config.instance_data_dir or config.dataset_name)
    if not held:
        raise EvalError(f"{run.name}: none of its held-out stills is in its training data "
                        f"({config.instance_data_dir or config.dataset_name}) any more; pass --reference_dir")
    images = [_small(decode_image(r.path if r.path is not None else dataset[r.row][config.image_column], max_pixels))
              for r in held]
    return images, f"{len(held)} held-out stills"


WEIGHTS = {"final": LORA_WEIGHTS_NAME, "ema": EMA_WEIGHTS_NAME}  # --weights: which file of each run is evaluated
MAX_DONE_BYTES = 1 << 20
MAX_EMBEDDINGS_BYTES = 512 << 20


def local_key() -> bytes:
    """A random key kept on this machine, never in a LoRA or output folder (``$XDG_CACHE_HOME/ddiff``, else
    ``~/.cache/ddiff``): it seals each LoRA's done.json, so results planted in a folder someone hands over are
    evaluated again, not reported."""
    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddiff" / "evaluation.key"
    if not (regular_file(path, 32) and path.stat().st_size == 32):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(os.urandom(32)))
        os.chmod(path, 0o600)
    return path.read_bytes()


def find_loras(lora_dir: Path, weight_name: str = LORA_WEIGHTS_NAME) -> list[LoraInfo]:
    """The LoRA folder itself, or every LoRA folder in it (a launch's output folder).

    Raises:
        EvalError: no LoRA; or, for the EMA copies, a LoRA without one (leaving it out would evaluate the others
            among fewer directors, which changes what the numbers mean).
    """
    lora_dir = Path(lora_dir)
    if weight_name != LORA_WEIGHTS_NAME:
        lacking = [run.name for run in find_loras(lora_dir) if not (run.path / weight_name).is_file()]
        if lacking:
            raise EvalError(f"{', '.join(lacking)}: no {weight_name} (trained without --use_ema); evaluate with "
                            "--weights final, or name a folder whose runs all have one")
    if (lora_dir / weight_name).is_file():
        return [lora_info(lora_dir, lora_dir.parent, weight_name)]
    found = scan_lora_dir(lora_dir, weight_name)
    if not found:
        raise EvalError(f"no LoRA in {lora_dir} (a folder holding {weight_name}, or folders that do)")
    return found


# -- the evaluation ------------------------------------------------------------------------------------------------
class Evaluation:
    def __init__(self, lora_dir: Path, output_dir: Path, settings: EvalSettings, *, clip_model: str,
                 reference_dir: Path | None = None, base_model: str | None = None, device=None,
                 dtype: torch.dtype = torch.float32, weights: str = "final"):
        if weights not in WEIGHTS:
            raise EvalError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        self.settings, self.clip_model, self.weights = settings, clip_model, weights
        self.output_dir = Path(output_dir)
        self.reference_dir = Path(reference_dir) if reference_dir else None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.runs = find_loras(Path(lora_dir), WEIGHTS[weights])
        self.root = Path(lora_dir)
        for run in self.runs:
            if run.error:
                raise EvalError(f"LoRA {run.name} cannot be evaluated: {run.error}")
        self.configs = {run.name: read_run_config(run.path) for run in self.runs}
        models = {c.pretrained_model_name_or_path for c in self.configs.values()}
        if base_model is None and len(models) > 1:
            raise EvalError(f"the LoRAs were trained on different base models ({', '.join(sorted(models))}); "
                            "pass --pretrained_model_name_or_path")
        self.base_model = base_model or models.pop()
        from ddiff_core.families import resolve_family

        # A local base must be a pipeline folder before anything reads it (a config could name any folder).
        family_name = None if Path(self.base_model).is_dir() else self.configs[self.runs[0].name].model_family
        self.family = resolve_family(self.base_model, family_name)
        for path in [self.output_dir, *(self.output_dir / run.name for run in self.runs),
                     *(self.output_dir / run.name / "images" for run in self.runs)]:
            if path.is_symlink():
                raise EvalError(f"{path} is a symlink; the evaluation writes only into plain folders")
        self.prompts = {run.name: self._prompts(run) for run in self.runs}
        self.references = {}
        for run in self.runs:  # every input is checked before a model loads
            self.references[run.name] = reference_images(run, self.configs[run.name], self.reference_dir)

    def _prompts(self, run: LoraInfo) -> list[str]:
        prompts = self.settings.prompts or tuple(self.configs[run.name].validation_prompts)
        if not prompts:
            raise EvalError(f"{run.name} has no validation prompts; pass --prompts_file")
        trigger = run.trigger or ""
        if len(trigger) > 200:
            raise EvalError(f"{run.name}: its model card's trigger phrase is over 200 characters")
        prompts = [" ".join(p.replace("{trigger}", trigger).split()) for p in prompts]
        if any(len(p) > 1000 for p in prompts):
            raise EvalError(f"{run.name}: a prompt is over 1000 characters once its trigger is filled in")
        return prompts

    def _key(self, run: LoraInfo, models: dict) -> str:
        """What this LoRA's evaluation depends on, sealed with this machine's key (``local_key``): an output folder
        that came with a received LoRA folder can hold a done.json, but not one this machine would accept."""
        return hmac.new(local_key(), self._fingerprint(run, models).encode(), hashlib.sha256).hexdigest()

    def _fingerprint(self, run: LoraInfo, models: dict) -> str:
        config = self.configs[run.name]
        references = hashlib.sha256()
        for image in self.references[run.name][0]:
            references.update(f"{image.size}".encode() + image.tobytes())
        return fingerprint({"format": EVAL_FORMAT, "lora": file_sha256(run.path / run.weight_name),
                            "references": references.hexdigest(), "prompts": self.prompts[run.name],
                            "settings": dataclasses.asdict(self._run_settings(config)),
                            **models, "dtype": str(self.dtype)})

    def _run_settings(self, config: TrainConfig) -> EvalSettings:
        return dataclasses.replace(self.settings, resolution=self.settings.resolution or config.resolution,
                                   max_sequence_length=self.settings.max_sequence_length or config.max_sequence_length
                                   or self.family.default_max_sequence_length)

    def run(self) -> dict:
        from ddiff_core.runs import model_identity

        models = {"clip": model_identity(self.clip_model), "base": model_identity(self.base_model)}  # read once
        keys = {run.name: self._key(run, models) for run in self.runs}
        todo = [run for run in self.runs if not self._done(run, keys[run.name])]
        if todo:
            scorer = ClipScorer(self.clip_model, self.device)  # a bad --clip_model fails before the pipeline loads
            family = self.family
            pipeline = family.load_pipeline(self.base_model, dtype=self.dtype, use_safetensors=True).to(self.device)
            pipeline.set_progress_bar_config(disable=True)
            bank = AdapterBank(pipeline, StaticCatalog(todo, self.root))
            if bank.unavailable:
                name, reason = next(iter(bank.unavailable.items()))
                raise EvalError(f"LoRA {name} does not load: {reason}")
            for run in todo:
                self._generate(run, family, pipeline, bank, scorer, keys[run.name])
            del pipeline, bank
        return self._report()

    def _folder(self, run: LoraInfo) -> Path:
        return self.output_dir / run.name

    def _done(self, run: LoraInfo, key: str) -> bool:
        try:
            path = self._folder(run) / "done.json"
            return regular_file(path, MAX_DONE_BYTES) and json.loads(path.read_text()).get("key") == key
        except (OSError, ValueError):
            return False

    def _generate(self, run, family, pipeline, bank, scorer: ClipScorer, key: str) -> None:
        settings = self._run_settings(self.configs[run.name])
        folder = self._folder(run)
        folder.mkdir(parents=True, exist_ok=True)
        images = {"base": [], "lora": []}
        for side, adapter in (("base", None), ("lora", run.name)):
            with bank.lock:
                bank.select(adapter)
                for prompt in self.prompts[run.name]:
                    images[side] += self._batched(pipeline, family, prompt, settings)
        prompts = self.prompts[run.name]
        n = len(settings.seeds)
        for side, side_images in images.items():
            for i, image in enumerate(side_images):
                atomic_write(folder / "images" / f"{side}-p{i // n:03d}-s{settings.seeds[i % n]}.png",
                             lambda tmp, im=image: im.save(tmp, format="PNG"))
        texts = scorer.texts([plain_prompt(p) for p in prompts])
        embeddings = {"base": scorer.images(images["base"]), "lora": scorer.images(images["lora"]),
                      "prompts": texts.repeat_interleave(n, dim=0), "references": scorer.images(self.references[run.name][0])}
        atomic_write(folder / "embeddings.safetensors",
                     lambda tmp: save_file({k: v.contiguous() for k, v in embeddings.items()}, str(tmp)))
        rows = [images["base"][i * n:(i + 1) * n] + images["lora"][i * n:(i + 1) * n] for i in range(len(prompts))]
        sheet = image_grid(rows)
        atomic_write(folder / "contact_sheet.png", lambda tmp: sheet.save(tmp, format="PNG"))
        atomic_write_text(folder / "done.json", json.dumps({"key": key, "prompts": prompts, "seeds": list(settings.seeds),
                                                            "references": self.references[run.name][1]}) + "\n")
        logger.info("evaluated %s: %d prompts x %d seeds", run.name, len(prompts), n)

    @torch.no_grad()
    def _batched(self, pipeline, family, prompt: str, settings: EvalSettings) -> list[Image.Image]:
        out = []
        seeds = list(settings.seeds)
        for i in range(0, len(seeds), settings.batch_size):
            chunk = seeds[i : i + settings.batch_size]
            generators = [torch.Generator(self.device).manual_seed(s) for s in chunk]
            out += pipeline(prompt=[prompt] * len(chunk), height=settings.resolution, width=settings.resolution,
                            num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                            generator=generators, **family.prompt_kwargs(settings.max_sequence_length)).images
        return out

    # -- the report ----------------------------------------------------------------------------------------------
    def _report(self) -> dict:
        names = [run.name for run in self.runs]
        for name in names:  # written by this machine just now or earlier (done.json's sealed key said so)
            for file, limit in (("embeddings.safetensors", MAX_EMBEDDINGS_BYTES), ("done.json", MAX_DONE_BYTES)):
                if not regular_file(self.output_dir / name / file, limit):
                    raise EvalError(f"{self.output_dir / name / file} is not a plain file of at most {limit} bytes")
        embeds = {name: load_file(self.output_dir / name / "embeddings.safetensors") for name in names}
        centroids = torch.stack([centroid(embeds[name]["references"]) for name in names])
        directors, true, predicted_lora, predicted_base = {}, [], [], []
        for i, name in enumerate(names):
            e = embeds[name]
            done = json.loads((self.output_dir / name / "done.json").read_text())
            lora_near, base_near = nearest_centroid(e["lora"], centroids), nearest_centroid(e["base"], centroids)
            true += [i] * len(e["lora"])
            predicted_lora += lora_near.tolist()
            predicted_base += base_near.tolist()
            directors[name] = {
                "images": len(e["lora"]), "prompts": done["prompts"], "seeds": done["seeds"],
                "references": done["references"],
                "prompt_adherence": {"base": _mean(cosine_to(e["base"], e["prompts"])),
                                     "lora": _mean(cosine_to(e["lora"], e["prompts"]))},
                "style_similarity": {"base": _mean(cosine_to(e["base"], centroids[i])),
                                     "lora": _mean(cosine_to(e["lora"], centroids[i]))},
                "identified_as_own": {"base": _share(base_near, i), "lora": _share(lora_near, i)},
            }
        report = {"clip_model": self.clip_model, "base_model": self.base_model, "weights": self.weights,
                  "directors": directors,
                  "confusion": {"labels": names, "lora": confusion_matrix(true, predicted_lora, len(names)),
                                "base": confusion_matrix(true, predicted_base, len(names))}}
        atomic_write_text(self.output_dir / "report.json", json.dumps(report, indent=1) + "\n")
        atomic_write_text(self.output_dir / "report.md", render_markdown(report))
        write_plots(report, self.output_dir)
        return report


def _mean(values: torch.Tensor) -> float:
    return round(float(values.double().mean()), 6)


def _share(predicted: torch.Tensor, own: int) -> float:
    return round(float((predicted == own).double().mean()), 6)


def render_markdown(report: dict) -> str:
    lines = ["# Evaluation", "", f"CLIP model `{report['clip_model']}`, base model `{report['base_model']}`, LoRA weights: "
             f"{'the EMA' if report.get('weights') == 'ema' else 'as trained'}.", "",
             "Higher is better. Base: the same pipeline with the adapter off, same prompts and seeds.", ""]
    for name, d in report["directors"].items():
        lines += [f"## {name}", "", f"{len(d['prompts'])} prompts x {len(d['seeds'])} seeds; references: "
                  f"{d['references']}. Contact sheet: `{name}/contact_sheet.png` (per prompt: base seeds, then LoRA).", "",
                  "| metric | base | LoRA | change |", "|---|---|---|---|"]
        for metric in ("style_similarity", "prompt_adherence", "identified_as_own"):
            base, lora = d[metric]["base"], d[metric]["lora"]
            lines.append(f"| {metric.replace('_', ' ')} | {base:.4f} | {lora:.4f} | {lora - base:+.4f} |")
        lines.append("")
    labels = report["confusion"]["labels"]
    if len(labels) > 1:
        lines += ["## Style identification", "", "Rows: the LoRA that made the images; columns: the nearest director "
                  "centroid (base images of the same prompts in brackets).", "",
                  "| LoRA \\ nearest | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for i, name in enumerate(labels):
            cells = [f"{report['confusion']['lora'][i][j]} ({report['confusion']['base'][i][j]})"
                     for j in range(len(labels))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_plots(report: dict, output_dir: Path) -> list[Path]:
    """``style_similarity.png`` (base vs LoRA per director) and ``confusion.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["directors"])
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 2.2 * len(names)) * 1.6, 3.6))
    for ax, metric in zip(axes, ("style_similarity", "prompt_adherence")):
        x = range(len(names))
        base = [report["directors"][n][metric]["base"] for n in names]
        lora = [report["directors"][n][metric]["lora"] for n in names]
        ax.bar([i - 0.2 for i in x], base, width=0.4, label="base", color="#999999")
        ax.bar([i + 0.2 for i in x], lora, width=0.4, label="LoRA", color="#c0392b")
        ax.set_xticks(list(x), names)
        ax.set_title(metric.replace("_", " ") + " (CLIP cosine)")
        ax.legend()
    fig.tight_layout()
    paths.append(_save_figure(fig, output_dir / "style_similarity.png"))
    plt.close(fig)
    matrix = report["confusion"]["lora"]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(matrix, cmap="Reds")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("nearest director centroid")
    ax.set_ylabel("LoRA")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center")
    ax.set_title("style identification")
    fig.tight_layout()
    paths.append(_save_figure(fig, output_dir / "confusion.png"))
    plt.close(fig)
    return paths


def _save_figure(fig, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
