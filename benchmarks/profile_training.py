"""Profiles N optimizer steps of the real training loop (LoraTrainer) with torch.profiler.

    python -m benchmarks.profile_training --size small --steps 5 --trace_dir benchmarks/traces

Writes gzipped Chrome traces with tensorboard_trace_handler (open with TensorBoard's profiler plugin or
ui.perfetto.dev) and prints the key_averages table. Never time anything under the profiler.
"""

import argparse
import tempfile

from benchmarks.cases import DEMO, RESOLUTION, model_dir
from ddiff_core.config import parse_config
from ddiff_core.profiling import step_profiler
from ddiff_core.trainer import LoraTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--family", default="flux")
    parser.add_argument("--steps", type=int, default=3, help="active (recorded) steps, after 1 wait and 1 warm-up")
    parser.add_argument("--trace_dir", default="benchmarks/traces")
    parser.add_argument("--cache_latents", action="store_true")
    args = parser.parse_args()
    config = parse_config([
        "--pretrained_model_name_or_path", str(model_dir(args.size, args.family)), "--instance_data_dir", str(DEMO),
        "--output_dir", tempfile.mkdtemp(prefix="ddiff-profile-"), "--resolution", str(RESOLUTION[args.size]),
        "--train_batch_size", "2", "--max_train_steps", str(args.steps + 2), "--max_sequence_length", "64",
        "--report_to", "none", "--seed", "0", "--checkpointing_steps", "100000",
        *(["--cache_latents"] if args.cache_latents else []),
    ])
    profiler = step_profiler(args.trace_dir, wait=1, warmup=1, active=args.steps)
    trainer = LoraTrainer(config, profiler=profiler).setup()
    trainer.train()
    trainer.cleanup()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"traces in {args.trace_dir}: tensorboard --logdir {args.trace_dir}  (or open the .pt.trace.json.gz in ui.perfetto.dev)")


if __name__ == "__main__":
    main()
