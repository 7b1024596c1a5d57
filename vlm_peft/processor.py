"""`VLMProcessor`: Qwen3 chat template with image slots, placeholder expansion, pixel_values."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image, ImageOps
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import load_image
from transformers.tokenization_utils_base import AddedToken

from .chat_template import QWEN3_VL_TEMPLATE
from .splice import image_runs

# Qwen3's chat markers; tiny test tokenizers may lack them, real Qwen ones never do.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited on white rather than dropped to black."""
    if min(image.size) == 0:
        raise ValueError(f"image has zero size {image.size}.")
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _image_parts(conversation: list[dict]) -> list[Any]:
    images = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") in ("image", "image_url"):
                    source = part.get("image", part.get("path", part.get("url", part.get("image_url"))))
                    if source is None:
                        raise ValueError(f"image content part {part} names no image (use 'image', 'path' or 'url').")
                    images.append(source)
    return images


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
        needed = [image_token, vision_start_token, vision_end_token, *CHAT_TOKENS]
        vocab = tokenizer.get_vocab()
        missing = [t for t in needed if t not in vocab]
        if missing:
            tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or QWEN3_VL_TEMPLATE)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def image_placeholder(self) -> str:
        return self.vision_start_token + self.image_token * self.num_image_tokens + self.vision_end_token

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        enable_thinking: bool = False,
        **kwargs: Any,
    ) -> str | list[str] | BatchFeature:
        """Render with image slots already expanded; with `tokenize=True`, also load the images
        named in the content parts and return model inputs."""
        batched = bool(conversation) and isinstance(conversation[0], list)
        conversations = conversation if batched else [conversation]
        texts = [
            self.tokenizer.apply_chat_template(
                conv,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                image_placeholder=self.image_placeholder,
                enable_thinking=enable_thinking,
            )
            for conv in conversations
        ]
        if not tokenize:
            return texts if batched else texts[0]
        images = [
            [load_image(src) if not isinstance(src, Image.Image) else src for src in _image_parts(conv)]
            for conv in conversations
        ]
        return self(text=texts, images=images if any(images) else None, **kwargs)

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize `text` and turn `images` (flat in reading order, or one list per sample) into
        `pixel_values`; the placeholder runs must match the images one to one."""
        if text is None:
            raise ValueError("VLMProcessor needs text holding one image placeholder per image.")
        texts = [text] if isinstance(text, str) else list(text)
        collapsed = self.vision_start_token + self.image_token + self.vision_end_token
        texts = [t.replace(collapsed, self.image_placeholder) for t in texts]
        flat, per_sample = self._flatten_images(images, len(texts))
        # Tensors need equal lengths; pad batches unless the caller decides.
        kwargs.setdefault("padding", return_tensors is not None and len(texts) > 1)
        encoded = self.tokenizer(texts, return_tensors=None, **kwargs)
        counts = []
        for row, ids in enumerate(encoded["input_ids"]):
            # Per sample, so an error names the sample of the batch.
            try:
                counts.append(
                    image_runs(torch.tensor([ids]), self.image_token_id, self.num_image_tokens, self.image_token)[0]
                )
            except ValueError as err:
                raise ValueError(str(err).replace("sample 0", f"sample {row}", 1)) from None
        if per_sample is not None:
            for row, (have, want) in enumerate(zip(counts, per_sample)):
                if have != want:
                    raise ValueError(
                        f"sample {row}: text holds {have} image placeholders but {want} images were given."
                    )
        elif sum(counts) != len(flat):
            raise ValueError(
                f"text holds {sum(counts)} image placeholders ({counts} per sample) but {len(flat)} images were given."
            )
        data = dict(encoded)
        if flat:
            rgb = []
            for i, image in enumerate(flat):
                if not isinstance(image, Image.Image):
                    raise ValueError(
                        f"image {i} is a {type(image).__name__}; pass PIL images (or paths via apply_chat_template)."
                    )
                rgb.append(to_rgb(image))
            data["pixel_values"] = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
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
