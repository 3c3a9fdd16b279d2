"""A vision-language captioner on transformers (Qwen2.5-VL by default): batched, left-padded generation."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import torch

from ddiff_core.captioning.base import DEFAULT_PROMPT, Captioner
from ddiff_core.precision import dtype_of

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"


def check_remote_code_revision(trust_remote_code: bool, revision: str | None) -> None:
    """Remote code runs on this machine, so it must be pinned to one commit: a branch or tag can move under you.

    Raises:
        ValueError: ``trust_remote_code`` without a full 40-hex-digit commit hash as ``revision``.
    """
    if trust_remote_code and not re.fullmatch(r"[0-9a-f]{40}", revision or ""):
        raise ValueError(f"--trust_remote_code needs --revision pinned to a full commit hash (40 lowercase hex "
                         f"digits), got {revision!r}")


def cap_words(text: str, max_words: int) -> str:
    """Control characters dropped, whitespace folded, at most ``max_words`` words."""
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cc" or ch in " \t\n")
    words = text.split()
    return " ".join(words[:max_words]).rstrip(",;:")


class VisionLanguageCaptioner(Captioner):
    """Any ``AutoModelForImageTextToText`` with a chat-template processor (local folder or hub id)."""

    def __init__(self, *, model: str | None = None, prompt: str = DEFAULT_PROMPT, max_words: int = 75,
                 max_new_tokens: int = 120, device: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False, revision: str | None = None, **_):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        check_remote_code_revision(trust_remote_code, revision)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = dtype_of(dtype or ("bf16" if self.device.startswith("cuda") else "fp32"))
        source = model or DEFAULT_MODEL
        self.processor = AutoProcessor.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        self.processor.tokenizer.padding_side = "left"  # generation continues from the right end of every row
        self.model = AutoModelForImageTextToText.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code, dtype=torch_dtype).to(self.device).eval()
        self.prompt, self.max_words, self.max_new_tokens = prompt, max_words, max_new_tokens

    def build_inputs(self, images: list) -> dict:
        """The model inputs for ``images``, one prompt each, left-padded to one length, on the model's device."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text] * len(images), images=images, padding=True, return_tensors="pt")
        return inputs.to(self.device)

    @torch.no_grad()
    def caption(self, images, names):
        inputs = self.build_inputs(images)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        generated = output[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        return [cap_words(t, self.max_words) for t in texts]

    @staticmethod
    def build_tiny(output_dir: str | Path, seed: int = 0) -> Path:
        """A random-weight vision-language model with its processor and a locally built tokenizer.

        The default class, Qwen2.5-VL, cannot be built here: in transformers 5 its processor requires the
        torchvision-backed video processor, and torchvision does not import beside the CPU torch this project pins.
        So the tiny model is a LLaVA (CLIP vision tower, Qwen2 language model, ChatML template): another
        ``AutoModelForImageTextToText`` class, loaded and run through exactly the same code path.
        """
        from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                                  LlavaProcessor, Qwen2Config)

        from ddiff_core.tokenizers import build_qwen_tokenizer, chat_template

        tokenizer = build_qwen_tokenizer()
        image_token = tokenizer.convert_tokens_to_ids("<image>")
        eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
            text_config=Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=1024, eos_token_id=eos, pad_token_id=pad,
                                    bos_token_id=None),
            image_token_index=image_token, vision_feature_select_strategy="default", vision_feature_layer=-1,
        )
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad
        model.generation_config.bos_token_id = None
        image_processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLS
                                   chat_template=chat_template("<image>"))
        output_dir = Path(output_dir)
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        return output_dir
