"""The processor on the real Qwen3 vocabulary, checked against an independent tiktoken encoder.

No hub here: the Qwen BPE ranks (151,643, shared by Qwen1/2/2.5/3) ship inside the PyPI package
`dashscope`. Adding Qwen3's 26 added tokens in id order gives a tokenizer equal to Qwen3's; the
reference is a `tiktoken.Encoding` over the same ranks, so id-level expectations are not taken
from the tokenizer under test.
"""

from __future__ import annotations

import logging
import unicodedata

import pytest
import tiktoken
from PIL import Image
from tiktoken.load import load_tiktoken_bpe
from transformers import PreTrainedTokenizerFast

from vlm_peft import VLMProcessor
from vlm_peft.tiny import tiny_image_processor

from .qwen_vocab import (
    ADDED_IDS,
    ADDED_TOKENS,
    NUM_RANKS,
    QWEN_PATTERN,
    build_qwen3_tokenizer,
    no_tiktoken_cache,
    qwen_tiktoken_path,
)

logger = logging.getLogger(__name__)

N = 16  # image tokens per image; small keeps the checks fast

TEXTS = [
    # English
    "Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you've seen it; they'll know, we'd go, she's here, it's HE'S, You'RE",
    "  leading spaces and trailing spaces   ",
    "A red circle. A blue square. A green triangle.",
    "Describe the image in detail, please.",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    # Chinese and other scripts
    "你好，世界！",
    "这是一张图片，上面有一个红色的圆。",
    "通义千问是阿里巴巴开发的大语言模型。",
    "日本語のテキストもあります。",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "Mixed 中英文 text with 数字123 inside.",
    # numbers
    "1234567890",
    "3.14159 and 2,718,281 and -42 and 1e-10",
    "The year 2026 had 365 days.",
    "０１２３ full-width digits",
    # code
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "import numpy as np\nprint(np.arange(10).reshape(2, 5))\n",
    "if a != b && c >= d || !e:\n        pass  # comment\n",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    "SELECT * FROM users WHERE id = 1;",
    '<div class="x">&nbsp;</div>',
    # emoji and symbols
    "I love 🍕 and 🎉!",
    "👨‍👩‍👧‍👦 family emoji with ZWJ",
    "Flags 🇨🇳🇺🇸 and ♥ ✓ ∑ ∞ →",
    "Ünïcödé àccents: café, naïve, résumé",
    "e\u0301 combining accent (NFC folds it)",
    "Ａｎｇｓｔｒｏｍ Å vs \u212b",
    # whitespace runs and newlines
    "a  b   c    d",
    "tab\tseparated\tvalues",
    "line1\nline2\n\nline4\n\n\n",
    "\n",
    "\n\n",
    "   \n   \n",
    "windows\r\nline\r\nendings",
    " ",
    "        ",
    "word\n\n\n\nword",
    # chat markers and added tokens
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What is this?",
    "<think>\n\n</think>\n\nThe answer.",
    '<tool_call>\n{"name": "f"}\n</tool_call>',
    "<tool_response>\nok\n</tool_response>",
    "<|endoftext|><|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2)<|box_end|>",
    "<|fim_prefix|>def<|fim_suffix|>pass<|fim_middle|><|fim_pad|><|repo_name|>r<|file_sep|>",
    "text<|im_end|>text <|im_start|> text",
    "<|im_start|",
    "user",
    "assistant",
    "system",
]


@pytest.fixture(scope="module")
def qwen_tokenizer() -> PreTrainedTokenizerFast:
    return build_qwen3_tokenizer()


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    with no_tiktoken_cache():
        ranks = load_tiktoken_bpe(qwen_tiktoken_path())
    assert len(ranks) == NUM_RANKS
    return tiktoken.Encoding(
        name="qwen3-reference",
        pat_str=QWEN_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=ADDED_IDS,
    )


def ref_encode(reference: tiktoken.Encoding, text: str) -> list[int]:
    # Qwen's tokenizers NFC-normalize before splitting; tiktoken does not.
    return reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")


@pytest.fixture(scope="module")
def qwen_processor(qwen_tokenizer) -> VLMProcessor:
    return VLMProcessor(tiny_image_processor(32), qwen_tokenizer, num_image_tokens=N)


def test_tokenizer_shape(qwen_tokenizer):
    assert len(qwen_tokenizer) == NUM_RANKS + len(ADDED_TOKENS) == 151_669
    for token, token_id in ADDED_IDS.items():
        assert qwen_tokenizer.convert_tokens_to_ids(token) == token_id, token
    special = {t for t in ADDED_TOKENS if t.startswith("<|")}
    assert set(qwen_tokenizer.all_special_tokens) <= special
    for added in qwen_tokenizer.added_tokens_decoder.values():
        assert added.special == (added.content in special), added


@pytest.mark.parametrize("text", TEXTS)
def test_matches_tiktoken_reference(qwen_tokenizer, reference, text):
    ids = qwen_tokenizer(text)["input_ids"]
    assert ids == ref_encode(reference, text)
    # Round trip (modulo NFC) through the ByteLevel decoder.
    assert qwen_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_anchor_ids(qwen_tokenizer, reference):
    anchors = {
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|image_pad|>": 151655,
        "<think>": 151667,
        "</think>": 151668,
    }
    for token, token_id in anchors.items():
        assert qwen_tokenizer.convert_tokens_to_ids(token) == token_id, token
        assert qwen_tokenizer(token)["input_ids"] == [token_id], token
    # "2026": Qwen splits digits one by one ("0" is rank 15), unlike cl100k's runs of up to three.
    words = {
        "user": [872],
        "assistant": [77091],
        "system": [8948],
        "\n": [198],
        "\n\n": [271],
        "2026": [17, 15, 17, 21],
    }
    for text, ids in words.items():
        assert qwen_tokenizer(text)["input_ids"] == ids, repr(text)
        assert ref_encode(reference, text) == ids, repr(text)
    assert qwen_tokenizer.eos_token_id == 151645
    assert qwen_tokenizer.pad_token_id == 151643


def test_processor_conversation_ids(qwen_processor, reference):
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red circle."},
    ]
    text = qwen_processor.apply_chat_template(conversation)
    expected_text = (
        "<|im_start|>user\n<|vision_start|>"
        + "<|image_pad|>" * N
        + "<|vision_end|>What is this?<|im_end|>\n"
        + "<|im_start|>assistant\n<think>\n\n</think>\n\nA red circle.<|im_end|>\n"
    )
    assert text == expected_text
    out = qwen_processor(text=text, images=[Image.new("RGB", (40, 30), (255, 0, 0))])
    ids = out["input_ids"][0].tolist()
    assert ids == ref_encode(reference, expected_text)
    assert ids[:4] == [151644, 872, 198, 151652]
    assert ids.count(151655) == N
    assert ids[ids.index(151652) + 1 : ids.index(151653)] == [151655] * N
    assert list(out["pixel_values"].shape) == [1, 3, 32, 32]
    assert out["attention_mask"][0].tolist() == [1] * len(ids)


def test_processor_collapsed_placeholder(qwen_processor, reference):
    # The one-pad form Qwen2-VL users write expands to the same N-pad run.
    out = qwen_processor(
        text="<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n",
        images=[Image.new("RGB", (32, 32), (0, 0, 255))],
    )
    expected = "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * N + "<|vision_end|>Hi<|im_end|>\n"
    assert out["input_ids"][0].tolist() == ref_encode(reference, expected)


def test_generation_prompt_ids(qwen_processor, reference):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = qwen_processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = qwen_processor(text=text, images=[Image.new("RGB", (32, 32))])["input_ids"][0].tolist()
    assert ids == ref_encode(reference, text)
    assert ids[-7:] == [151644, 77091, 198, 151667, 271, 151668, 271]


def test_processor_adds_no_tokens(qwen_tokenizer, qwen_processor):
    assert len(qwen_processor.tokenizer) == len(qwen_tokenizer) == 151_669
    assert qwen_processor.image_token_id == 151655
    assert qwen_processor.tokenizer.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert qwen_processor.tokenizer.convert_tokens_to_ids("<|vision_end|>") == 151653
