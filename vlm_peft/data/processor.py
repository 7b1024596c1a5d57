"""`VLMProcessor`: Qwen3 chat template with image slots, placeholder expansion, pixel_values."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import load_image
from transformers.tokenization_utils_base import AddedToken

from ..model.splice import image_runs
from .chat_template import QWEN3_VL_TEMPLATE

# Qwen3's chat markers; tiny test tokenizers may lack them, real Qwen ones never do.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def _high_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey images to 8-bit grey by their value range, where PIL's
    own conversion clips every value above 255 to white."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0  # 65535 -> 255
    elif image.mode == "F" and values.min(initial=0) >= 0 and values.max(initial=0) <= 1:
        values = values * 255.0  # floats in [0, 1]
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited on white rather than dropped to black, and
    high-bit-depth grey (16-bit PNGs, 32-bit integer, float) is scaled to 8 bits, not clipped."""
    if min(image.size) == 0:
        raise ValueError(f"image has zero size {image.size}.")
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_bit_to_l(image).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class VLMProcessor(ProcessorMixin):
    """Tokenizer + image processor for a vlm-peft model.

    Each image becomes `<|vision_start|>` + N x `<|image_pad|>` + `<|vision_end|>`. Text may hold
    that full run or the collapsed one-pad form Qwen2-VL users write; both expand to N.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        num_image_tokens: int = 196,
        image_token: str = "<|image_pad|>",
        vision_start_token: str = "<|vision_start|>",
        vision_end_token: str = "<|vision_end|>",
        **kwargs: Any,
    ) -> None:
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.vision_start_token = vision_start_token
        self.vision_end_token = vision_end_token
        if tokenizer is None or image_processor is None:
            raise ValueError("VLMProcessor needs both an image processor and a tokenizer.")
        needed = [image_token, vision_start_token, vision_end_token, *CHAT_TOKENS]
        vocab = tokenizer.get_vocab()
        missing = [t for t in needed if t not in vocab]
        if missing:
            tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or QWEN3_VL_TEMPLATE)

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """As transformers saves it, without the truncation and padding that the last call left on
        the fast tokenizer: tokenizer.json would keep them, and the loaded tokenizer would then
        default to that call's max_length."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend.no_truncation()
            backend.no_padding()
        return super().save_pretrained(save_directory, *args, **kwargs)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def image_placeholder(self) -> str:
        return self.vision_start_token + self.image_token * self.num_image_tokens + self.vision_end_token

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def apply_chat_template(self, conversation: list[dict] | list[list[dict]], **kwargs: Any) -> Any:
        """transformers' processor `apply_chat_template` (tokenize, return_dict, images from content
        parts, tools, assistant masks), rendering image slots expanded and Qwen3's non-thinking mode
        unless `enable_thinking=True`."""
        kwargs.setdefault("enable_thinking", False)
        kwargs.setdefault("image_placeholder", self.image_placeholder)
        return super().apply_chat_template(conversation, **kwargs)

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize `text` and turn `images` (flat in reading order, or one list per sample) into
        `pixel_values`; the placeholder runs must match the images one to one. Keyword arguments
        are routed to the tokenizer or the image processor as in every transformers processor."""
        if text is None:
            raise ValueError("VLMProcessor needs text holding one image placeholder per image.")
        texts = [text] if isinstance(text, str) else list(text)
        collapsed = self.vision_start_token + self.image_token + self.vision_end_token
        texts = [t.replace(collapsed, self.image_placeholder) for t in texts]
        # False when the images arrive as cached features: the runs are still checked, not counted.
        images_expected = kwargs.pop("images_expected", True)
        flat, per_sample = self._flatten_images(images, len(texts))
        kwargs.setdefault("return_tensors", "pt")
        # Tensors need equal lengths: pad batches unless the caller decides.
        kwargs.setdefault("padding", len(texts) > 1)
        merged = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs = merged["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        encoded = self.tokenizer(texts, **text_kwargs)
        counts = []
        for row, ids in enumerate(encoded["input_ids"]):
            # Per sample, so that an error names the sample of the batch.
            try:
                runs = image_runs(torch.tensor([ids]), self.image_token_id, self.num_image_tokens, self.image_token)
            except ValueError as err:
                raise ValueError(str(err).replace("sample 0", f"sample {row}", 1)) from None
            counts.append(runs[0])
        if not images_expected:
            if flat:
                raise ValueError("images were given with images_expected=False.")
        elif per_sample is not None:
            for row, (have, want) in enumerate(zip(counts, per_sample)):
                if have != want:
                    raise ValueError(f"sample {row}: text holds {have} image placeholders but {want} images given.")
        elif sum(counts) != len(flat):
            raise ValueError(
                f"text holds {sum(counts)} image placeholders ({counts} per sample) but {len(flat)} images were given."
            )
        data = dict(encoded)
        if flat:
            rgb = []
            for i, image in enumerate(flat):
                if isinstance(image, str):
                    image = load_image(image)
                if not isinstance(image, Image.Image):
                    raise ValueError(f"image {i} is a {type(image).__name__}; pass PIL images or paths.")
                rgb.append(to_rgb(image))
            images_kwargs = {**merged["images_kwargs"], "return_tensors": "pt"}
            data["pixel_values"] = self.image_processor(images=rgb, **images_kwargs)["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)

    @staticmethod
    def _flatten_images(images: Any, num_texts: int) -> tuple[list[Any], list[int] | None]:
        if images is None:
            return [], None
        if not isinstance(images, (list, tuple)):
            return [images], None
        if images and all(isinstance(item, (list, tuple)) for item in images):
            if len(images) != num_texts:
                raise ValueError(f"got {len(images)} image lists for {num_texts} texts; give one list per text.")
            return [img for item in images for img in item], [len(item) for item in images]
        return list(images), None
