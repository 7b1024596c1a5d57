"""Tiny offline fixtures: a BPE tokenizer, a random Qwen3 and a random CLIP vision tower."""

from __future__ import annotations

import os

import datasets
import pytest
import torch
from PIL import Image

from vlm_peft import VLMConfig, VLMProcessor
from vlm_peft.tiny import tiny_clip_config, tiny_image_processor, tiny_qwen3, tiny_tokenizer

N = 8  # image tokens per image in the tiny setup
CORPUS = [
    "What is this? A red circle. A blue square. A green triangle. Describe the image.",
    "user assistant system The picture shows a yellow star on a white background.",
] * 20


@pytest.fixture(scope="session", autouse=True)
def datasets_cache(tmp_path_factory):
    """load_rows writes Arrow files to datasets' cache: the tests' go to a temp dir (subprocesses too)."""
    path = tmp_path_factory.mktemp("hf_datasets_cache")
    old, old_env = datasets.config.HF_DATASETS_CACHE, os.environ.get("HF_DATASETS_CACHE")
    datasets.config.HF_DATASETS_CACHE = path
    os.environ["HF_DATASETS_CACHE"] = str(path)
    yield path
    datasets.config.HF_DATASETS_CACHE = old
    if old_env is None:
        os.environ.pop("HF_DATASETS_CACHE", None)
    else:
        os.environ["HF_DATASETS_CACHE"] = old_env


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer(CORPUS)


@pytest.fixture()
def processor(tokenizer):
    return VLMProcessor(tiny_image_processor(32), tokenizer, num_image_tokens=N)


@pytest.fixture()
def vlm_cfg(processor):
    return VLMConfig(
        vision_model=None,
        vision_config=tiny_clip_config(),
        num_image_tokens=N,
        projector_layers=2,
        projector_heads=4,
        projector_dropout=0.0,
        image_token_id=processor.image_token_id,
    )


@pytest.fixture()
def llm(tokenizer):
    torch.manual_seed(0)
    return tiny_qwen3(len(tokenizer))


def make_image(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Image.Image:
    return Image.new("RGB", size, color).convert(mode)


def user_turn(text: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]
