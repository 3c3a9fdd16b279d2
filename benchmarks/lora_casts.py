"""peft's round-trip casts of the LoRA inputs, kept (peft's default) vs skipped (ddiff), in one cached bf16 step.

    python -m benchmarks.lora_casts [--size small] [--pairs 40] [--saved_bytes_resolution 1024]
        [--output benchmarks/results/lora-casts-cpu.json]

The frozen weights are bf16 and the LoRA fp32 under autocast, as the trainer runs them. Reported per step: the dtype
casts (``aten::_to_copy`` calls) and the bytes they write, which do not depend on the machine; the step time, from
the two variants interleaved in one process (kept, skipped, skipped, kept, ...) so that drift of a noisy machine
falls on both alike; whether the loss and every LoRA gradient are bitwise equal; and the activations a block of
FLUX.1-dev's width keeps for the backward either way (``saved_bytes_per_block``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.cases import Env, _training, sync
from benchmarks.harness import cpu_description
from ddiff_core.speed import skip_lora_input_casts
from ddiff_core.trainer import compute_loss

REPO = Path(__file__).resolve().parents[1]


class CastCounter(TorchDispatchMode):
    """Counts ``aten::_to_copy`` calls (every dtype or device cast) and the bytes they produce."""

    def __init__(self):
        super().__init__()
        self.calls = self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            self.calls += 1
            self.bytes += out.numel() * out.element_size()
        return out


def _set_casts(denoiser, kept: bool) -> None:
    if kept:
        skip_lora_input_casts(denoiser, skip=False)
    elif not skip_lora_input_casts(denoiser):
        raise SystemExit("skip_lora_input_casts changed no layer of this bf16 model")


def saved_bytes_per_block(resolution: int, text_tokens: int = 512) -> dict:
    """Activation bytes each kind of block keeps for the backward at FLUX.1-dev's width (hidden 3072), batch 1, with
    peft's input casts kept and skipped: one double- and one single-stream block in a full-width FLUX, bf16, ddiff's
    default LoRA (rank 16, every linear layer of every block), one forward under autocast, inputs that need
    gradients (as every block after the first sees them). Counted, not timed: the distinct storages each block saves,
    parameters excluded."""
    from benchmarks.test_full_model import FLUX_DEV, build_full_flux
    from ddiff_core.builders import add_trainable_lora
    from ddiff_core.families import get_family

    family = get_family("flux")
    model = build_full_flux("cpu", **{**FLUX_DEV, "num_layers": 1, "num_single_layers": 1})
    add_trainable_lora(model, family, rank=16, alpha=16, dropout=0.0, lora_layers=None, seed=0)
    blocks = {"double": model.transformer_blocks[0], "single": model.single_transformer_blocks[0]}
    side = resolution // 16
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, side * side, FLUX_DEV["in_channels"], generator=gen, dtype=torch.bfloat16,
                                  requires_grad=True),
        encoder_hidden_states=torch.randn(1, text_tokens, FLUX_DEV["joint_attention_dim"], generator=gen,
                                          dtype=torch.bfloat16, requires_grad=True),
        pooled_projections=torch.randn(1, FLUX_DEV["pooled_projection_dim"], generator=gen, dtype=torch.bfloat16),
        timestep=torch.tensor([0.5], dtype=torch.bfloat16), guidance=torch.tensor([3.5], dtype=torch.bfloat16),
        img_ids=torch.zeros(side * side, 3, dtype=torch.bfloat16), txt_ids=torch.zeros(text_tokens, 3, dtype=torch.bfloat16))
    result = {}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for kept in (True, False):
        _set_casts(model, kept)
        current, seen, counts = [None], set(parameters), {name: 0 for name in blocks}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if current[0] is not None and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                counts[current[0]] += storage.nbytes()
            return tensor

        handles = []
        for name, block in blocks.items():
            handles.append(block.register_forward_pre_hook(lambda m, a, name=name: current.__setitem__(0, name)))
            handles.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            out = model(**inputs, return_dict=False)[0]
        del out
        for handle in handles:
            handle.remove()
        result["kept" if kept else "skipped"] = counts
    return {"resolution": resolution, "tokens": side * side + text_tokens, **result}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--saved_bytes_resolution", type=int, default=1024,
                        help="also count the activations a FLUX.1-dev-width block saves at this resolution (0: skip; "
                             "1024 takes about 40 s and 4 GB)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "lora-casts-cpu.json")
    args = parser.parse_args(argv)
    t = _training(Env(size=args.size, device=args.device), weight_dtype=torch.bfloat16)
    batch = next(t.batches)
    with torch.no_grad():  # a trained-looking LoRA (B is zero at init), so its path carries gradient to the inputs
        for param in t.denoiser.parameters():
            if param.requires_grad:
                param.normal_(std=0.02, generator=torch.Generator(param.device).manual_seed(1))

    def loss_and_grads(kept: bool):
        _set_casts(t.denoiser, kept)
        t.generator.manual_seed(0)
        t.denoiser.zero_grad(set_to_none=True)
        counter = CastCounter()
        with counter:
            loss = compute_loss(t.objective, t.denoiser, t.features, t.latent_norm, batch, t.generator,
                                t.weight_dtype, autocast=t.autocast)
            loss.backward()
        grads = [p.grad.clone() for p in t.denoiser.parameters() if p.requires_grad]
        return loss.detach(), grads, counter

    kept, skipped = loss_and_grads(True), loss_and_grads(False)
    equal = torch.equal(kept[0], skipped[0]) and all(torch.equal(a, b) for a, b in zip(kept[1], skipped[1]))

    def step(kept_casts: bool) -> float:
        _set_casts(t.denoiser, kept_casts)
        start = time.perf_counter()
        t.optimizer.zero_grad(set_to_none=True)
        compute_loss(t.objective, t.denoiser, t.features, t.latent_norm, next(t.batches), t.generator,
                     t.weight_dtype, autocast=t.autocast).backward()
        t.optimizer.step()
        sync(args.device)
        return time.perf_counter() - start

    for _ in range(3):
        step(False)
    times = {True: [], False: []}
    for i in range(args.pairs):
        for kept_casts in ((True, False) if i % 2 == 0 else (False, True)):
            times[kept_casts].append(step(kept_casts))
    ratios = sorted(a / b for a, b in zip(times[True], times[False]))
    quartiles = statistics.quantiles(ratios, n=4)
    result = {
        "model": f"flux {args.size}", "device": args.device, "cpu": cpu_description(), "torch": torch.__version__,
        "bitwise_equal": equal, "pairs": args.pairs,
        "kept": {"casts": kept[2].calls, "cast_mb": kept[2].bytes / 2**20, "median_s": statistics.median(times[True])},
        "skipped": {"casts": skipped[2].calls, "cast_mb": skipped[2].bytes / 2**20,
                    "median_s": statistics.median(times[False])},
        "ratio_median": statistics.median(ratios), "ratio_q1": quartiles[0], "ratio_q3": quartiles[2],
    }
    if args.saved_bytes_resolution:
        result["saved_bytes"] = saved_bytes_per_block(args.saved_bytes_resolution)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))


def render(result: dict) -> str:
    kept, skipped = result["kept"], result["skipped"]
    return "\n".join([
        f"## peft's LoRA input casts under autocast: kept vs skipped ({result['model']}, bf16 base, fp32 LoRA, "
        f"{result['device']})", "",
        f"CPU {result['cpu'][0]} ({result['cpu'][1]}); torch {result['torch']}. One cached training step (forward and "
        f"backward). Casts and bytes are counted (`aten::_to_copy`), not timed. Time: {result['pairs']} interleaved "
        f"pairs in one process; ratio = kept / skipped per pair, median and quartiles. Loss and LoRA gradients "
        f"{'bitwise equal' if result['bitwise_equal'] else 'NOT equal'}. Command: `python -m benchmarks.lora_casts`.", "",
        "| peft input casts | casts per step | MiB cast per step | step (median) |", "|---|---|---|---|",
        f"| kept (peft's default) | {kept['casts']} | {kept['cast_mb']:.1f} | {kept['median_s'] * 1e3:.1f} ms |",
        f"| skipped (ddiff) | {skipped['casts']} | {skipped['cast_mb']:.1f} | {skipped['median_s'] * 1e3:.1f} ms |",
        f"| ratio | {kept['casts'] / skipped['casts']:.2f}x fewer | {kept['cast_mb'] / skipped['cast_mb']:.2f}x less | "
        f"{result['ratio_median']:.2f} ({result['ratio_q1']:.2f}-{result['ratio_q3']:.2f}) |", ""]
        + _render_saved(result.get("saved_bytes")))


def _render_saved(saved: dict | None) -> list[str]:
    if not saved:
        return []
    mib = 2**20
    kept, skipped = saved["kept"], saved["skipped"]
    blocks = {"double": 19, "single": 38}  # FLUX.1-dev
    total = sum(n * (kept[k] - skipped[k]) for k, n in blocks.items())
    return [f"Activations (parameters excluded) kept for the backward at FLUX.1-dev's width (hidden 3072, ddiff's "
            f"default rank-16 LoRA, {saved['resolution']} px, {saved['tokens']} tokens with the text, batch 1), per "
            "block; counted on the CPU. The totals include what the CPU's attention saves, which differs on a GPU. "
            "The difference is the cast copies of LoRA inputs: where layers share one input (q, k, v; the single "
            "block's MLP), on any device; at batch 1 also to_out's, whose input is a view of the attention output, "
            "which flash attention (the CPU's here, and CUDA's) saves anyway; at batch 2 and more that view is "
            "copied, and that part (a third of the double block's) goes.", "",
            "| block | peft's casts kept | skipped | saved per block | FLUX.1-dev (19 double + 38 single) |",
            "|---|---|---|---|---|"] + [
            f"| {k}-stream | {kept[k] / mib:,.1f} MiB | {skipped[k] / mib:,.1f} MiB | "
            f"{(kept[k] - skipped[k]) / mib:,.1f} MiB | {n * (kept[k] - skipped[k]) / 2**30:.2f} GiB |"
            for k, n in blocks.items()] + [f"| all | | | | {total / 2**30:.2f} GiB less, without checkpointing |", ""]


if __name__ == "__main__":
    main()
