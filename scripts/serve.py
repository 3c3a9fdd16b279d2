"""Serve base vs LoRA images in a web page: one set of base weights, each LoRA a named adapter.

    python scripts/serve.py --pretrained_model_name_or_path models/tiny-flux --lora_dir outputs

Binds 127.0.0.1 unless --host says otherwise, which then needs a login: DDIFF_SERVE_AUTH=USER:PASSWORD in the
environment or --auth_file FILE holding USER:PASSWORD (a password given as --auth shows in `ps`). Never creates a
share link. Blind votes go to --votes_db, outside the LoRA folder.
"""

import argparse
import ipaddress
import os
import sys
from pathlib import Path

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
AUTH_ENV = "DDIFF_SERVE_AUTH"


def default_votes_db() -> Path:
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "ddiff" / "votes.sqlite"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--pretrained_model_name_or_path", default="models/tiny-flux")
    parser.add_argument("--model_family", default=None)
    parser.add_argument("--lora_dir", default="outputs", help="one sub-folder per LoRA (pytorch_lora_weights.safetensors)")
    parser.add_argument("--votes_db", default=None, help=f"SQLite file of blind votes (default {default_votes_db()})")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--allowed_hosts", default="", help="comma-separated host names clients use to reach this "
                        "server (required with --host 0.0.0.0 or ::, e.g. 192.168.1.5,studio.lan)")
    parser.add_argument("--auth_file", default=None, help="a file holding USER:PASSWORD (or set DDIFF_SERVE_AUTH)")
    parser.add_argument("--auth", default=None, help="USER:PASSWORD (visible in ps: prefer DDIFF_SERVE_AUTH or --auth_file)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--max_sequence_length", type=int, default=None,
                        help="T5 tokens per prompt, for every LoRA (default: the length each LoRA was trained at, "
                             "from its training_config.yaml, else the family's: 512 for FLUX, 256 for SD3)")
    parser.add_argument("--default_size", type=int, default=None, help="default: 512 on cuda, 128 on cpu")
    parser.add_argument("--default_steps", type=int, default=None, help="default: 28 on cuda, 4 on cpu")
    parser.add_argument("--generations_per_minute", type=int, default=10, help="per client address")
    parser.add_argument("--votes_per_hour", type=int, default=30, help="per client address")
    parser.add_argument("--queue_size", type=int, default=24, help="requests waiting at most (generations, votes, "
                        "page loads)")
    return parser.parse_args(argv)


def read_auth(args) -> str | None:
    """USER:PASSWORD from --auth_file, the environment, or --auth (in that order of preference)."""
    if args.auth_file:
        return Path(args.auth_file).read_text().strip()
    return os.environ.get(AUTH_ENV) or args.auth


def check_exposure(host: str, auth: str | None) -> tuple[str, str] | None:
    """Refuses a non-local address without a login; returns the (user, password) pair."""
    if auth is not None and (":" not in auth or not auth.split(":", 1)[0] or not auth.split(":", 1)[1]):
        raise ValueError("the login must be USER:PASSWORD")
    local = host in LOCAL_HOSTS
    if not local:
        try:
            local = ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = False
    if not local and auth is None:
        raise ValueError(f"refusing to listen on {host} without a login (set {AUTH_ENV} or pass --auth_file)")
    return tuple(auth.split(":", 1)) if auth else None


def main(argv=None) -> int:
    args = parse_args(argv)
    votes_db = Path(args.votes_db) if args.votes_db else default_votes_db()
    try:
        if min(args.generations_per_minute, args.votes_per_hour, args.queue_size) < 1:
            raise ValueError("--generations_per_minute, --votes_per_hour and --queue_size must be at least 1")
        if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= 512:
            raise ValueError(f"--max_sequence_length must be between 1 and 512, got {args.max_sequence_length}")
        auth = check_exposure(args.host, read_auth(args))
        allowed_hosts = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
        if args.host in ("0.0.0.0", "::") and not allowed_hosts:
            raise ValueError(f"--host {args.host} answers on every interface: name the host names clients use "
                             "with --allowed_hosts (requests naming any other host are refused)")
        if args.auth:
            print("warning: --auth shows the password in the process list; use DDIFF_SERVE_AUTH or --auth_file",
                  file=sys.stderr)
        if votes_db.resolve().is_relative_to(Path(args.lora_dir).resolve()):
            # Each vote's write-ahead log would change the LoRA folder and make the catalog read it again.
            raise ValueError(f"--votes_db {votes_db} is inside --lora_dir; keep it elsewhere")
        from ddiff_core.families import resolve_family

        family = resolve_family(args.pretrained_model_name_or_path, args.model_family)
    except (ValueError, OSError) as err:
        hint = " (run ./run.sh demo first to build the tiny model and a LoRA)" if "tiny-flux" in str(err) else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2

    import torch

    from ddiff_core.precision import dtype_of
    from ddiff_core.serving.page import serve
    from ddiff_core.serving.server import StyleServer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype_of(args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
    server = StyleServer.load(family, args.pretrained_model_name_or_path, args.lora_dir, votes_db, device=device,
                              dtype=dtype, max_sequence_length=args.max_sequence_length,
                              votes_per_hour=args.votes_per_hour)
    if not server.catalog.list():
        print(f"warning: no LoRA folders in {Path(args.lora_dir).resolve()} yet; they are picked up when they appear",
              file=sys.stderr)
    for name, reason in server.unavailable().items():
        print(f"warning: LoRA {name} is unavailable: {reason}", file=sys.stderr)
    cuda = device.startswith("cuda")
    print(f"serving on http://{args.host}:{args.port}/ (votes: {votes_db})", file=sys.stderr)
    serve(server, host=args.host, port=args.port, auth=auth, allowed_hosts=allowed_hosts, default_size=args.default_size or (512 if cuda else 128),
          default_steps=args.default_steps or (28 if cuda else 4), generations_per_minute=args.generations_per_minute,
          queue_size=args.queue_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
