"""Serve base vs LoRA images in a web page: one set of base weights, each LoRA a named adapter.

    python scripts/serve.py --pretrained_model_name_or_path models/tiny-flux --lora_dir outputs

Binds 127.0.0.1 unless --host says otherwise, which then needs --auth USER:PASSWORD. Never creates a share link.
"""

import argparse
import ipaddress
import sys
from pathlib import Path

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--pretrained_model_name_or_path", default="models/tiny-flux")
    parser.add_argument("--model_family", default=None)
    parser.add_argument("--lora_dir", default="outputs", help="one sub-folder per LoRA (pytorch_lora_weights.safetensors)")
    parser.add_argument("--votes_db", default="outputs/votes.sqlite")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", default=None, help="USER:PASSWORD; required to listen beyond this machine")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--max_sequence_length", type=int, default=512)
    parser.add_argument("--default_size", type=int, default=None, help="default: 512 on cuda, 128 on cpu")
    parser.add_argument("--default_steps", type=int, default=None, help="default: 28 on cuda, 4 on cpu")
    return parser.parse_args(argv)


def check_exposure(host: str, auth: str | None) -> tuple[str, str] | None:
    """Refuses a non-local address without --auth; returns the (user, password) pair."""
    if auth is not None and (":" not in auth or not auth.split(":", 1)[0] or not auth.split(":", 1)[1]):
        raise ValueError("--auth must be USER:PASSWORD")
    local = host in LOCAL_HOSTS
    if not local:
        try:
            local = ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = False
    if not local and auth is None:
        raise ValueError(f"refusing to listen on {host} without --auth USER:PASSWORD")
    return tuple(auth.split(":", 1)) if auth else None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        auth = check_exposure(args.host, args.auth)
        from ddiff_core.families import resolve_family

        family = resolve_family(args.pretrained_model_name_or_path, args.model_family)
    except ValueError as err:
        hint = " (run ./run.sh demo first to build the tiny model and a LoRA)" if "tiny-flux" in str(err) else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2

    import torch

    from ddiff_core.precision import dtype_of
    from ddiff_core.serving.app import StyleServer, build_app

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype_of(args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
    server = StyleServer.load(family, args.pretrained_model_name_or_path, args.lora_dir, args.votes_db, device=device,
                              dtype=dtype, max_sequence_length=args.max_sequence_length)
    if not server.catalog.list():
        print(f"warning: no LoRA folders in {Path(args.lora_dir).resolve()} yet; they are picked up when they appear",
              file=sys.stderr)
    cuda = device.startswith("cuda")
    app = build_app(server, default_size=args.default_size or (512 if cuda else 128),
                    default_steps=args.default_steps or (28 if cuda else 4))
    # Adapter selection is pipeline-wide: one generation at a time, a bounded queue for the rest.
    app.queue(default_concurrency_limit=1, max_size=16)
    app.launch(server_name=args.host, server_port=args.port, auth=auth, share=False, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
