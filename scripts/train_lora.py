"""Train a LoRA on a diffusers model (FLUX.1 and the other registered families).

    accelerate launch scripts/train_lora.py \\
        --pretrained_model_name_or_path models/tiny-flux --instance_data_dir data/demo \\
        --resolution 64 --train_batch_size 2 --max_train_steps 20 --output_dir outputs/demo-lora

Flags follow diffusers' examples/dreambooth/train_dreambooth_lora_flux.py; --config FILE.yaml holds the same keys,
and a `runs:` list in it trains one LoRA per entry (each into OUTPUT_DIR/<name>) over one loaded base model.
Exit codes: 0 done, 2 bad input (of any run), 3 non-finite loss, 4 out of GPU memory (the message says what lowers it),
128+N stopped by signal N (a checkpoint was written).
"""

import logging
import os
import sys

from ddiff_core.config import ConfigError, parse_launch
from ddiff_core.process import run_process


def main(argv=None) -> int:
    try:
        specs = parse_launch(argv, description=__doc__.splitlines()[0])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # torch, diffusers and the rest load only once the flags are known to be good (a bad flag fails in a blink).
    from accelerate import PartialState

    from ddiff_core.launch import run_launch
    from ddiff_core.trainer import TrainingInterrupted

    try:
        report = run_launch(specs)  # checks every run's data, family and checkpoint before loading a model
    except TrainingInterrupted as stop:  # the checkpoint is already committed
        print(f"{stop}", file=sys.stderr)
        return stop.exit_code
    main_process = PartialState().is_main_process if PartialState._shared_state else os.environ.get("RANK", "0") == "0"
    if main_process:
        for outcome in report.outcomes:
            if outcome.status == "failed":
                print(f"error: {f'run {outcome.name}: ' if outcome.name else ''}{outcome.message}", file=sys.stderr)
        if len(specs) > 1 or any(o.status == "finished earlier" for o in report.outcomes):
            print(report.table())
        for outcome in report.outcomes:
            if outcome.summary:
                print(outcome.summary)
    return report.exit_code


if __name__ == "__main__":
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    run_process(main)
