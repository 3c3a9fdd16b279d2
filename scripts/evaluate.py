"""Evaluate LoRAs against their directors: base vs LoRA images from one pipeline, scored with CLIP.

    python scripts/evaluate.py --lora_dir loras/ --output_dir loras/eval \\
        [--prompts_file prompts.txt] [--seeds 0,1,2,3] [--clip_model openai/clip-vit-large-patch14] \\
        [--reference_dir stills/] [--num_inference_steps 28] [--resolution 1024]

--lora_dir is one LoRA folder or a folder of them (a launch's --output_dir). Each director's references are its
run's held-out stills (--holdout) or --reference_dir/<name>/. Writes report.json, report.md, style_similarity.png,
confusion.png and a contact sheet per LoRA; a re-run reuses every LoRA already evaluated with the same settings.
Exit codes: 0 done, 2 bad input.
"""

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--lora_dir", required=True)
    parser.add_argument("--output_dir", default=None, help="default: LORA_DIR/eval")
    parser.add_argument("--prompts_file", default=None, help="one prompt per line; {trigger} is each LoRA's trigger "
                                                             "(default: each run's validation prompts)")
    parser.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds, one image per prompt and seed")
    parser.add_argument("--clip_model", default="openai/clip-vit-large-patch14", help="hub id or local folder")
    parser.add_argument("--reference_dir", default=None, help="reference stills: a folder per LoRA name, or one folder")
    parser.add_argument("--pretrained_model_name_or_path", default=None, help="default: the base the LoRAs trained on")
    parser.add_argument("--num_inference_steps", type=int, default=28)
    parser.add_argument("--guidance_scale", type=float, default=3.5)
    parser.add_argument("--resolution", type=int, default=None, help="square side (default: each run's --resolution)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per pipeline call")
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                        help="pipeline dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--weights", default="final", choices=["final", "ema"],
                        help="each run's trained LoRA, or its EMA (runs trained with --use_ema; default output folder "
                             "LORA_DIR/eval-ema)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ddiff_core.evaluation import MAX_SEEDS, EvalError, EvalSettings, read_prompts

    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        if not 0 < len(seeds) <= MAX_SEEDS or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError
    except ValueError:
        print(f"error: --seeds must be 1 to {MAX_SEEDS} distinct non-negative integers, got {args.seeds!r}",
              file=sys.stderr)
        return 2
    for name in ("num_inference_steps", "batch_size"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be at least 1", file=sys.stderr)
            return 2
    if args.resolution is not None and not 16 <= args.resolution <= 4096:
        print("error: --resolution must be between 16 and 4096", file=sys.stderr)
        return 2
    import torch

    from ddiff_core.data import DataError
    from ddiff_core.evaluation import Evaluation
    from ddiff_core.families import UnknownModelError
    from ddiff_core.precision import dtype_of

    precision = args.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    try:
        prompts = read_prompts(Path(args.prompts_file)) if args.prompts_file else None
        settings = EvalSettings(seeds=seeds, num_inference_steps=args.num_inference_steps,
                                guidance_scale=args.guidance_scale, resolution=args.resolution, prompts=prompts,
                                batch_size=args.batch_size)
        default_out = Path(args.lora_dir) / ("eval" if args.weights == "final" else "eval-ema")
        evaluation = Evaluation(Path(args.lora_dir), Path(args.output_dir or default_out), settings,
                                clip_model=args.clip_model, reference_dir=args.reference_dir,
                                base_model=args.pretrained_model_name_or_path, dtype=dtype_of(precision),
                                weights=args.weights)
        report = evaluation.run()
    except (EvalError, DataError, UnknownModelError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = evaluation.output_dir
    for name, d in report["directors"].items():
        s, a = d["style_similarity"], d["prompt_adherence"]
        print(f"{name}: style similarity {s['base']:.3f} -> {s['lora']:.3f}; prompt adherence {a['base']:.3f} -> "
              f"{a['lora']:.3f}; identified as own {d['identified_as_own']['base']:.0%} -> "
              f"{d['identified_as_own']['lora']:.0%}")
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    sys.exit(main())
