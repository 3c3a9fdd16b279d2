"""Train a LoRA on a diffusers model (FLUX.1 and the other registered families).

    accelerate launch scripts/train_lora.py \\
        --pretrained_model_name_or_path models/tiny-flux --instance_data_dir data/demo \\
        --resolution 64 --train_batch_size 2 --max_train_steps 20 --output_dir outputs/demo-lora

Flags follow diffusers' examples/dreambooth/train_dreambooth_lora_flux.py; --config FILE.yaml holds the same keys.
Exit codes: 0 done, 2 bad input, 3 non-finite loss, 128+N stopped by signal N (a checkpoint was written).
"""

import logging
import sys

from ddiff_core.config import ConfigError, parse_config
from ddiff_core.process import run_process


def main(argv=None) -> int:
    try:
        config = parse_config(argv, description=__doc__.splitlines()[0])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # torch, diffusers and the rest load only once the flags are known to be good (a bad flag fails in a blink).
    from ddiff_core.checkpoint import CheckpointError
    from ddiff_core.data import DataError
    from ddiff_core.families import UnknownModelError
    from ddiff_core.trainer import LoraTrainer, NonFiniteLoss, TrainingInterrupted

    try:
        trainer = LoraTrainer(config)
        trainer.setup()  # checks data, family, resolution and any named checkpoint before loading a model
    except (DataError, UnknownModelError, CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        trainer.train()
        trainer.save()
        code = 0
    except TrainingInterrupted as stop:  # the checkpoint is already committed
        print(f"{stop}", file=sys.stderr)
        code = stop.exit_code
    except (NonFiniteLoss, CheckpointError) as err:  # a checkpoint is refused only for non-finite weights
        print(f"error: {err}", file=sys.stderr)
        code = 3
    trainer.cleanup()
    if code == 0 and trainer.accelerator.is_main_process:
        print(trainer.summary())
    return code


if __name__ == "__main__":
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    run_process(main)
