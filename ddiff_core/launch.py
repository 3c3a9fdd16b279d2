"""One launch, one or many runs: the base model and its encoders are loaded once, every run's caches are built while
the encoders are loaded, the encoders are freed, then each run's LoRA is added, trained, saved and removed in turn.

A run whose inputs are unusable is reported and skipped, the others go on; a run found finished (same run
fingerprint, last step reached) is skipped; a half-finished one resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ddiff_core.atomic import atomic_write_text
from ddiff_core.checkpoint import CheckpointError
from ddiff_core.config import RunSpec
from ddiff_core.trainer import (INPUT_ERRORS, LoraTrainer, NonFiniteLoss, OutOfMemory, TrainingInterrupted,
                                load_shared_base, make_accelerator, offload_idle_vae, release_encoders)

logger = logging.getLogger(__name__)
LAUNCH_FILE = "launch.json"


@dataclass
class Outcome:
    name: str | None
    output_dir: str
    status: str  # "trained", "finished earlier" or "failed"
    code: int = 0  # the exit code this run alone would end with
    message: str = ""
    steps: int = 0
    seconds: float = 0.0
    summary: str = ""  # where a trained run's outputs are


@dataclass
class LaunchReport:
    outcomes: list[Outcome]
    base_load_s: float = 0.0  # reading the base model (once for the whole launch)
    features_s: float = 0.0  # building or reading every run's caches and validation prompts
    total_s: float = 0.0

    @property
    def exit_code(self) -> int:
        return max((o.code for o in self.outcomes), default=0)

    def table(self) -> str:
        width = max(len(o.name or "run") for o in self.outcomes)
        lines = [f"  {(o.name or 'run'):<{width}}  {o.status:<16} {o.message or o.output_dir}" for o in self.outcomes]
        loaded = (f"base model loaded once in {self.base_load_s:.1f} s" if self.base_load_s
                  else "base model not loaded (nothing to train)")
        return "\n".join([f"{len(self.outcomes)} runs; {loaded}", *lines])


class _Launch:
    def __init__(self, specs: list[RunSpec], profiler=None):
        self.specs = specs
        self.outcomes = {id(s): Outcome(s.name, s.config.output_dir, "pending") for s in specs}
        self.trainers = {id(s): LoraTrainer(s.config, profiler=profiler, name=s.name) for s in specs}
        self.main_process = int(os.environ.get("RANK", "0")) == 0

    def fail(self, spec, err: Exception, code: int = 2) -> None:
        outcome = self.outcomes[id(spec)]
        outcome.status, outcome.code, outcome.message = "failed", code, str(err)
        if self.main_process and spec.name:  # the script prints every failure at the end; this puts it in the log too
            logger.warning("run %s failed; the others go on", spec.name)

    def run(self) -> LaunchReport:
        report = LaunchReport([self.outcomes[id(s)] for s in self.specs])
        start = time.perf_counter()
        ready = []
        for spec in self.specs:  # every run's inputs, before any model loads
            try:
                self.trainers[id(spec)].check_inputs()
                ready.append(spec)
            except INPUT_ERRORS as err:
                self.fail(spec, err)
        if not ready:
            report.total_s = time.perf_counter() - start
            self._write(report, None)
            return report
        first = self.trainers[id(ready[0])]
        project_dir = Path(first.config.output_dir)
        if self.specs[0].name is not None:
            project_dir = project_dir.parent
        accelerator = make_accelerator(first.config, project_dir)
        self.main_process = accelerator.is_main_process
        pending = []
        for spec in ready:
            try:
                if self.trainers[id(spec)].attach(accelerator):
                    pending.append(spec)
                else:
                    self.outcomes[id(spec)].status = "finished earlier"
                    self.outcomes[id(spec)].steps = self.trainers[id(spec)].max_train_steps
            except INPUT_ERRORS as err:
                self.fail(spec, err)
        if pending:
            tick = time.perf_counter()
            components = load_shared_base(first.family, first.config, accelerator)
            report.base_load_s = time.perf_counter() - tick
            logger.info("loaded the base model in %.2f s (once, for %d of %d runs)", report.base_load_s, len(pending),
                        len(self.specs))
            tick = time.perf_counter()
            built = []
            for spec in pending:
                try:
                    self.trainers[id(spec)].build_features(components)
                    built.append(spec)
                except INPUT_ERRORS as err:
                    self.fail(spec, err)
            if built:
                freed = release_encoders([self.trainers[id(s)] for s in built])
                if offload_idle_vae([self.trainers[id(s)] for s in built]):
                    freed.append("vae (to the CPU until validation)")
                logger.info("caches of %d runs ready in %.1f s; freed %s", len(built), time.perf_counter() - tick,
                            ", ".join(freed) or "nothing")
            report.features_s = time.perf_counter() - tick
            for spec in built:
                self._train(spec)
        report.total_s = time.perf_counter() - start
        self._write(report, accelerator)
        return report

    def _write(self, report: LaunchReport, accelerator) -> None:
        """``launch.json`` in the launch's folder (a launch with a runs: list), by the main process."""
        if self.specs[0].name is None or (accelerator is not None and not accelerator.is_main_process):
            return
        if accelerator is None and int(os.environ.get("RANK", "0")) != 0:
            return
        folder = Path(self.specs[0].config.output_dir).parent
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / LAUNCH_FILE, json.dumps(
            {"base_load_s": report.base_load_s, "features_s": report.features_s, "total_s": report.total_s,
             "runs": [{k: v for k, v in asdict(o).items() if k != "summary"} for o in report.outcomes]}, indent=1)
            + "\n")

    def _train(self, spec: RunSpec) -> None:
        trainer, outcome = self.trainers[id(spec)], self.outcomes[id(spec)]
        tick = time.perf_counter()
        try:
            try:
                trainer.start()
            except INPUT_ERRORS as err:  # e.g. --lora_layers matching nothing, a checkpoint that does not fit
                self.fail(spec, err)
                return
            trainer.train()
            trainer.save()
            outcome.status, outcome.summary = "trained", trainer.summary()
        except TrainingInterrupted:  # its checkpoint is written; the launch stops here
            outcome.status = "interrupted"
            raise
        except (NonFiniteLoss, CheckpointError) as err:  # a checkpoint is refused only for non-finite weights
            self.fail(spec, err, code=3)
        except OutOfMemory as err:
            self.fail(spec, err, code=4)
        finally:
            outcome.steps, outcome.seconds = trainer.global_step, time.perf_counter() - tick
            trainer.cleanup()


def run_launch(specs: list[RunSpec], profiler=None) -> LaunchReport:
    """Trains every run of ``specs`` (see the module's docstring); raises TrainingInterrupted on a signal."""
    return _Launch(specs, profiler).run()
