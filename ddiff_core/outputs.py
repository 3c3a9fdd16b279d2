"""What a run leaves in its folder: the per-step metrics log, the LoRA, its model card, config and summary."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ddiff_core.atomic import atomic_write_text
from ddiff_core.lora import EMA_WEIGHTS_NAME, save_kohya_copy, save_lora, write_model_card


class MetricsLog:
    """``metrics.jsonl``: one JSON line per optimizer step, appended and flushed as the run goes."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        """The complete lines (a line cut short by a kill is dropped)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append(record)
        return out

    def truncate_after(self, step: int) -> None:
        """Keeps the steps up to ``step``: those logged after a checkpoint are trained again on resume."""
        kept = [r for r in self.records() if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)


class RunOutputs:
    """The files of a finished (or starting) run, each written atomically into ``output_dir``."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl")

    def write_skipped(self, skipped: list[tuple[str, str]]) -> Path:
        return atomic_write_text(self.output_dir / "skipped_images.txt",
                                 "".join(f"{name}\t{reason}\n" for name, reason in skipped))

    def write_buckets(self, report: dict) -> Path:
        return atomic_write_text(self.output_dir / "buckets.json", json.dumps(report, indent=1) + "\n")

    def write_summary(self, summary: dict) -> Path:
        return atomic_write_text(self.output_dir / "run_summary.json", json.dumps(summary, indent=2) + "\n")

    def write_lora(self, family, denoiser, lora_config, *, kohya: bool = False, ema=None) -> Path:
        """The LoRA (and, given the run's EMA, its average as ``pytorch_lora_weights_ema.safetensors``)."""
        if ema is not None:
            with ema.swapped_in():
                save_lora(self.output_dir, family, denoiser, lora_config, weight_name=EMA_WEIGHTS_NAME)
        path = save_lora(self.output_dir, family, denoiser, lora_config)
        if kohya:
            save_kohya_copy(self.output_dir, family, denoiser, lora_config)
        return path

    def write_card(self, **card) -> Path:
        return write_model_card(self.output_dir, **card)

    def write_config(self, config_dict: dict) -> Path:
        path = self.output_dir / "training_config.yaml"
        return atomic_write_text(path, f"# accelerate launch scripts/train_lora.py --config {path}\n"
                                       + yaml.safe_dump(config_dict, sort_keys=False))
