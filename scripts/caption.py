"""Caption a folder of stills into metadata.jsonl (file_name, text), the layout train_lora.py reads.

    python scripts/caption.py --input_dir stills/nolan --trigger_phrase "<nolan-style>" \\
        [--captioner qwen2.5-vl|template] [--model PATH] [--batch_size N] [--caption_column text]
"""

import argparse
import sys
import time
from pathlib import Path

from ddiff_core.captioning import REGISTRY
from ddiff_core.captioning.base import DEFAULT_PROMPT
from ddiff_core.captioning.runner import TRIGGER_PLACEMENTS, caption_folder, list_images
from ddiff_core.captioning.vlm import check_remote_code_revision
from ddiff_core.data import read_metadata


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--input_dir", required=True)
    parser.add_argument("--trigger_phrase", default=None, help='e.g. "<nolan-style>"')
    parser.add_argument("--trigger_placement", default="start_end", choices=TRIGGER_PLACEMENTS)
    parser.add_argument("--captioner", default="qwen2.5-vl", choices=REGISTRY.names())
    parser.add_argument("--model", default=None, help="local folder or hub id (vision-language captioners)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--trust_remote_code", action="store_true", help="only with --revision set to a commit hash")
    parser.add_argument("--caption_column", default="text", help="the metadata.jsonl field the captions go into")
    parser.add_argument("--prompt", default=None, help="the instruction sent with each image")
    parser.add_argument("--prompt_file", default=None, help="a file holding the instruction")
    parser.add_argument("--text", default=None, help="template captioner: a fixed caption (default: from file names)")
    parser.add_argument("--max_words", type=int, default=75)
    parser.add_argument("--max_new_tokens", type=int, default=120)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--overwrite", action="store_true", help="caption images that already have a caption")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.batch_size < 1 or args.max_words < 1:
            raise ValueError("--batch_size and --max_words must be at least 1")
        if args.caption_column in ("", "file_name"):
            raise ValueError(f"--caption_column must name a field other than file_name, got {args.caption_column!r}")
        check_remote_code_revision(args.trust_remote_code, args.revision)
        prompt = Path(args.prompt_file).read_text().strip() if args.prompt_file else (args.prompt or DEFAULT_PROMPT)
        folder = Path(args.input_dir)
        list_images(folder)  # a missing or empty folder fails here, before any model loads
        read_metadata(folder)  # and so does a metadata.jsonl that could not be rewritten without losing rows
        captioner = REGISTRY.load(args.captioner)(
            model=args.model, text=args.text, prompt=prompt, max_words=args.max_words,
            max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
            trust_remote_code=args.trust_remote_code, revision=args.revision,
        )
        start = time.perf_counter()
        result = caption_folder(folder, captioner, trigger=args.trigger_phrase, placement=args.trigger_placement,
                                batch_size=args.batch_size, overwrite=args.overwrite,
                                caption_column=args.caption_column)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    rate = result["captioned"] / seconds if seconds > 0 else 0.0
    print(f"captioned {result['captioned']} images ({rate:.2f} images/s), kept {result['skipped_existing']} existing "
          f"captions, skipped {len(result['bad'])} unreadable files -> {folder / 'metadata.jsonl'}")
    for name, reason in result["bad"]:
        print(f"  bad file: {name}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
