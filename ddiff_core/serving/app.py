"""The style server: one pipeline with every LoRA as a named adapter, request checks, and the Gradio page.

Every request is checked on the server (not only by the widgets) before anything reaches the model, and
generation is serialised: the active adapter is pipeline-wide state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ddiff_core.serving.adapters import AdapterBank, LoraCatalog, LoraInfo
from ddiff_core.serving.votes import VoteStore

BASE = "(base model)"


class RequestError(ValueError):
    """A request the server refuses; the message says why, in one line."""


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 500
    min_steps: int = 1
    max_steps: int = 50
    sizes: tuple[int, ...] = (64, 128, 256, 512, 768, 1024)
    max_guidance: float = 20.0
    max_seed: int = 2**32 - 1


def director_name(lora_name: str) -> str:
    """'nolan-style' -> 'Nolan'; 'wes_anderson' -> 'Wes Anderson'."""
    stem = re.sub(r"[-_ ]?(style|lora)$", "", lora_name, flags=re.IGNORECASE)
    return " ".join(part.capitalize() for part in re.split(r"[-_ ]+", stem) if part) or lora_name


def styled_prompts(prompt: str, info: LoraInfo) -> tuple[str, str]:
    """(LoRA prompt, base prompt): the trigger phrase added when absent; the base gets 'in the style of X' instead."""
    trigger = info.trigger
    lora_prompt = prompt if not trigger or trigger in prompt else f"{trigger} {prompt}"
    plain = " ".join(prompt.replace(trigger, " ").split()) if trigger else prompt
    return lora_prompt, f"{plain}, in the style of {director_name(info.name)}"


def check_request(lim: Limits, prompt, steps, size, guidance, seed) -> tuple[str, int, int, float, int]:
    """Coerces and bounds every generation parameter; raises RequestError before any model work."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("the prompt is empty")
    if len(prompt) > lim.max_prompt_chars:
        raise RequestError(f"the prompt is {len(prompt)} characters; the limit is {lim.max_prompt_chars}")
    try:
        steps, size, seed, guidance = int(steps), int(size), int(seed), float(guidance)
    except (TypeError, ValueError) as err:
        raise RequestError(f"steps, size and seed must be whole numbers and guidance a number ({err})") from err
    if not lim.min_steps <= steps <= lim.max_steps:
        raise RequestError(f"steps must be between {lim.min_steps} and {lim.max_steps}, got {steps}")
    if size not in lim.sizes:
        raise RequestError(f"size {size} is not one of {', '.join(map(str, lim.sizes))}")
    if not 0.0 <= guidance <= lim.max_guidance:
        raise RequestError(f"guidance must be between 0 and {lim.max_guidance}, got {guidance}")
    if not 0 <= seed <= lim.max_seed:
        raise RequestError(f"seed must be between 0 and {lim.max_seed}, got {seed}")
    return prompt.strip(), steps, size, guidance, seed


class StyleServer:
    """Generates base and LoRA images from one set of base weights."""

    def __init__(self, pipeline, catalog: LoraCatalog, votes: VoteStore, limits: Limits = Limits(),
                 prompt_kwargs: dict | None = None):
        self.pipeline, self.catalog, self.votes, self.limits = pipeline, catalog, votes, limits
        self.prompt_kwargs = prompt_kwargs or {}  # the family's extra text arguments
        self.bank = AdapterBank(pipeline, catalog)

    @classmethod
    def load(cls, family, model_path: str, lora_dir, votes_db, *, device: str = "cpu", dtype=torch.float32,
             max_sequence_length: int = 512) -> "StyleServer":
        """Loads the family's pipeline once and serves every LoRA folder under ``lora_dir`` from it."""
        pipeline = family.load_pipeline(model_path, dtype=dtype).to(device)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, LoraCatalog(lora_dir), VoteStore(votes_db),
                   prompt_kwargs=family.prompt_kwargs(max_sequence_length))

    def styles(self) -> list[str]:
        return [item.name for item in self.catalog.list()]

    # -- checks ------------------------------------------------------------------------------
    def check(self, prompt, steps, size, guidance, seed) -> tuple[str, int, int, float, int]:
        return check_request(self.limits, prompt, steps, size, guidance, seed)

    def style(self, name) -> LoraInfo:
        """A LoRA chosen by name from the loaded set; paths, '..' and URLs are refused."""
        if not isinstance(name, str) or not name or any(s in name for s in ("/", "\\", "..", ":")):
            raise RequestError(f"choose a LoRA by its name from the list, not {name!r}")
        try:
            return self.catalog.get(name)
        except KeyError as err:
            raise RequestError(f"unknown LoRA {name!r}; loaded: {', '.join(self.styles()) or 'none'}") from err

    # -- generation --------------------------------------------------------------------------
    def _image(self, prompt: str, lora: str | None, steps: int, size: int, guidance: float, seed: int):
        with self.bank.lock:
            self.bank.select(lora)
            device = self.pipeline.device
            with torch.no_grad():
                return self.pipeline(
                    prompt=prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator(device).manual_seed(seed), **self.prompt_kwargs,
                ).images[0]

    def compare(self, prompt, style, seed, steps, size, guidance):
        """(base image, LoRA image) for the same prompt and seed."""
        prompt, steps, size, guidance, seed = self.check(prompt, steps, size, guidance, seed)
        info = self.style(style)
        lora_prompt, base_prompt = styled_prompts(prompt, info)
        return (self._image(base_prompt, None, steps, size, guidance, seed),
                self._image(lora_prompt, info.name, steps, size, guidance, seed))

    def single(self, prompt, style, seed, steps, size, guidance):
        """One image, from a LoRA or (``style`` == BASE) the base model."""
        prompt, steps, size, guidance, seed = self.check(prompt, steps, size, guidance, seed)
        if style == BASE:
            return self._image(prompt, None, steps, size, guidance, seed)
        info = self.style(style)
        return self._image(styled_prompts(prompt, info)[0], info.name, steps, size, guidance, seed)

    def blind(self, prompt, style, seed, steps, size, guidance):
        """Base and LoRA images in random order; returns (left, right, token). The order stays on the server."""
        base, lora = self.compare(prompt, style, seed, steps, size, guidance)
        token, base_side = self.votes.new_pair(style, prompt.strip(), int(seed))
        return (base, lora, token) if base_side == "left" else (lora, base, token)

    def vote(self, token, side) -> str:
        try:
            winner = self.votes.vote(str(token or ""), side)
        except ValueError as err:
            raise RequestError(str(err)) from err
        return winner

    def win_rate_table(self) -> list[list]:
        return [[lora, votes, wins, f"{wins / votes:.0%}"] for lora, wins, votes in self.votes.win_rates()]


def build_app(server: StyleServer, *, default_size: int = 512, default_steps: int = 28):
    """The Gradio page: compare, single image, blind vote. Every handler goes through the server's checks."""
    import gradio as gr

    def guarded(fn):
        def handler(*args):
            try:
                return fn(*args)
            except RequestError as err:
                raise gr.Error(str(err)) from err
        handler.__name__ = fn.__name__
        return handler

    styles = server.styles()  # read once for the page; refreshed on load from the cached catalog
    sizes = [s for s in server.limits.sizes]
    default_size = default_size if default_size in sizes else sizes[0]

    def controls():
        with gr.Row():
            seed = gr.Number(value=0, precision=0, label="seed", minimum=0, maximum=server.limits.max_seed)
            steps = gr.Slider(server.limits.min_steps, server.limits.max_steps, value=default_steps, step=1,
                              label="steps")
            size = gr.Dropdown(sizes, value=default_size, label="size (px)")
            guidance = gr.Slider(0.0, server.limits.max_guidance, value=3.5, step=0.5, label="guidance")
        return seed, steps, size, guidance

    with gr.Blocks(title="ddiff: base vs LoRA") as app:
        gr.Markdown("# Base vs LoRA\nOne set of base weights; each director's LoRA is a named adapter.")
        with gr.Tab("Compare"):
            prompt = gr.Textbox(label="prompt", max_lines=3, elem_id="compare-prompt")
            # allow_custom_value: a LoRA added after start-up is accepted; the server checks every name itself.
            style = gr.Dropdown(styles, value=styles[0] if styles else None, label="LoRA", elem_id="compare-style",
                                allow_custom_value=True)
            seed, steps, size, guidance = controls()
            go = gr.Button("Compare", variant="primary", elem_id="compare-button")
            with gr.Row():
                base_image = gr.Image(label="base", type="pil", elem_id="base-image")
                lora_image = gr.Image(label="LoRA", type="pil", elem_id="lora-image")
            go.click(guarded(server.compare), [prompt, style, seed, steps, size, guidance], [base_image, lora_image],
                     api_name="compare")
        with gr.Tab("Single"):
            prompt1 = gr.Textbox(label="prompt", max_lines=3)
            style1 = gr.Dropdown([BASE, *styles], value=styles[0] if styles else BASE, label="model",
                                 allow_custom_value=True)
            seed1, steps1, size1, guidance1 = controls()
            go1 = gr.Button("Generate", variant="primary")
            image1 = gr.Image(label="image", type="pil")
            go1.click(guarded(server.single), [prompt1, style1, seed1, steps1, size1, guidance1], image1,
                      api_name="single")
        with gr.Tab("Blind vote"):
            prompt2 = gr.Textbox(label="prompt", max_lines=3)
            style2 = gr.Dropdown(styles, value=styles[0] if styles else None, label="LoRA", allow_custom_value=True)
            seed2, steps2, size2, guidance2 = controls()
            token = gr.Textbox(visible=False)  # the pair id; which side is the base stays on the server
            go2 = gr.Button("Show a pair", variant="primary")
            with gr.Row():
                left = gr.Image(label="A", type="pil")
                right = gr.Image(label="B", type="pil")
            with gr.Row():
                pick_left, pick_right = gr.Button("A is better"), gr.Button("B is better")
            result = gr.Markdown()
            table = gr.Dataframe(headers=["LoRA", "votes", "LoRA wins", "win rate"], value=server.win_rate_table(),
                                 interactive=False)
            go2.click(guarded(server.blind), [prompt2, style2, seed2, steps2, size2, guidance2], [left, right, token],
                      api_name="blind")

            def cast(token_value, side):
                winner = server.vote(token_value, side)
                return f"You picked the {'LoRA' if winner == 'lora' else 'base'} image.", server.win_rate_table(), ""

            pick_left.click(guarded(lambda t: cast(t, "left")), token, [result, table, token], api_name="vote_left")
            pick_right.click(guarded(lambda t: cast(t, "right")), token, [result, table, token], api_name="vote_right")

            def vote_api(token_value, side):
                winner = server.vote(token_value, side)
                return winner, server.win_rate_table()

            hidden_token, hidden_side, hidden_winner = gr.Textbox(visible=False), gr.Textbox(visible=False), gr.Textbox(visible=False)
            hidden_table = gr.Dataframe(visible=False)
            api_vote = gr.Button(visible=False)
            api_vote.click(guarded(vote_api), [hidden_token, hidden_side], [hidden_winner, hidden_table], api_name="vote")

        def refresh():
            names = server.styles()
            first = names[0] if names else None
            return (gr.update(choices=names, value=first), gr.update(choices=[BASE, *names]),
                    gr.update(choices=names, value=first))

        app.load(refresh, None, [style, style1, style2], api_name="styles_refresh")
    return app
