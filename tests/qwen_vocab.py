"""Qwen3's tokenizer rebuilt offline from the BPE ranks that ship in the PyPI package `dashscope`.

The ranks (151,643, shared by Qwen1/2/2.5/3) plus Qwen3's 26 added tokens in id order give a
tokenizer equal to Qwen3's (design.md). Used by the vocabulary tests and by the test that runs
the Qwen3-0.6B recipe at reduced depth.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from importlib import resources

from tokenizers import AddedToken, normalizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from vlm_peft.tiny import QWEN3_ADDED_TOKENS

logger = logging.getLogger(__name__)

NUM_RANKS = 151_643
# Qwen2/3 split: single digits (`\p{N}`, not cl100k's `\p{N}{1,3}`).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ADDED_TOKENS = QWEN3_ADDED_TOKENS
ADDED_IDS = {token: NUM_RANKS + i for i, token in enumerate(ADDED_TOKENS)}


def qwen_tiktoken_path() -> str:
    return str(resources.files("dashscope").joinpath("resources", "qwen.tiktoken"))


@contextlib.contextmanager
def no_tiktoken_cache():
    # tiktoken copies even local files into a temp-dir cache; an empty cache dir turns that off.
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def build_qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen3's fast tokenizer rebuilt from the tiktoken ranks (a few seconds)."""
    start = time.perf_counter()
    with no_tiktoken_cache():
        backend = TikTokenConverter(vocab_file=qwen_tiktoken_path(), pattern=QWEN_PATTERN).converted()
    backend.model.ignore_merges = False  # as in Qwen3's tokenizer.json; every rank is reachable by merges anyway
    backend.normalizer = normalizers.NFC()
    # Only the <|...|> ones are special in Qwen3; tool_call/tool_response/think are plain added tokens.
    for token in ADDED_TOKENS:
        added = AddedToken(token, special=token.startswith("<|"), normalized=False)
        backend.add_tokens([added])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )
    logger.info("Qwen3 tokenizer built in %.1f s", time.perf_counter() - start)
    return tok
