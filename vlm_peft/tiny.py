"""Tiny random models and a tiny BPE tokenizer, for tests, demos and offline experiments.

Nothing here downloads: the tokenizer is trained on the texts given, the models are built
from configs with random weights.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# Qwen3's special tokens that the chat format and image slots use.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<think>",
    "</think>",
]
# All of Qwen3's added tokens, from id 151643 on, in id order. Those written `<|…|>` are special
# (dropped by skip_special_tokens); the tool-call, tool-response and think markers are text.
QWEN3_ADDED_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]

QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tiny_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, special_tokens: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, with Qwen3's special tokens and pad/eos conventions."""
    special_tokens = SPECIAL_TOKENS if special_tokens is None else special_tokens
    tok = Tokenizer(models.BPE())
    # Qwen's split rule: GPT-2's would cut "\n\nA" differently from a prompt ending in "\n\n",
    # so answers would be tokenized one way in training and another at generation.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    markers = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        clean_up_tokenization_spaces=False,
        **{k: v for k, v in markers.items() if v in special_tokens},
    )


def tiny_qwen3_config(vocab_size: int, hidden_size: int = 64, layers: int = 2, **overrides) -> Qwen3Config:
    params = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    params.update(overrides)
    return Qwen3Config(**params)


def tiny_qwen3(vocab_size: int, **kwargs) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(tiny_qwen3_config(vocab_size, **kwargs)).eval()


def tiny_clip_config(image_size: int = 32, patch_size: int = 8, hidden_size: int = 32) -> dict:
    """A CLIP vision config dict (as `VLMConfig.vision_config` takes)."""
    cfg = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    ).to_dict()
    cfg["model_type"] = "clip_vision_model"
    return cfg


def tiny_siglip_config(image_size: int = 32, patch_size: int = 8, hidden_size: int = 32) -> dict:
    """A SigLIP vision config dict, the size of `tiny_clip_config`'s."""
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
    }


def tiny_image_processor(image_size: int = 32) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
