"""Tokenizers built in memory from a character vocabulary, so tiny pipelines need nothing from the hub."""

from __future__ import annotations

import string

from transformers import CLIPTokenizer, T5TokenizerFast

# Printable ASCII plus the characters of the trigger phrases; enough for any caption to tokenize.
_CHARS = sorted(set(string.ascii_letters + string.digits + string.punctuation))


def build_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A byte-pair tokenizer with a character vocabulary and a handful of merges."""
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>"] + _CHARS + [c + "</w>" for c in _CHARS]:
        vocab.setdefault(token, len(vocab))
    # transformers 5 wants merges as tuples in memory; a string list is parsed differently.
    merges = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("e", "r</w>")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_t5_tokenizer(max_length: int = 512) -> T5TokenizerFast:
    """A unigram tokenizer over single characters (built from a piece list, not a file)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in _CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "<image>"]


def chat_template(image_placeholder: str) -> str:
    """A ChatML template (Qwen's layout) that writes ``image_placeholder`` where a message holds an image."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image_placeholder +
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def build_qwen_tokenizer():
    """A byte-level BPE tokenizer with Qwen2-VL's special tokens (256 byte symbols, a few merges)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "t"), ("i", "n")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    return tokenizer
