"""OpenAI chat-completion requests -> what `generation.render` takes, checked field by field.

Every refusal is an `APIError` naming the field (OpenAI's `param`, a JSON path such as
`messages[0].content[1].image_url`) and what to send instead; the server turns it into OpenAI's error JSON.
Images are decoded here, so a bad image is a 400 before anything is queued.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from ..data.processor import to_rgb

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n",
    "stream", "stream_options", "chat_template_kwargs", "user", "metadata", "frequency_penalty", "presence_penalty",
    "logprobs",
}  # fmt: skip
# Accepted at OpenAI's default value only: anything else would change the answer in a way this server ignores.
DEFAULT_ONLY = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False}
URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
MAX_STOP_CHARS = 256  # each stop string is matched against the answer's tail at every streamed piece
MAX_ASPECT = 20  # image processors resize the shortest side: a 1 x 16M-pixel strip would become gigapixels


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, the offending request field and a machine-readable code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=code)


@dataclass
class Limits:
    max_images: int = 8  # per request, the whole conversation
    max_image_bytes: int = 20 * 2**20  # encoded
    max_image_pixels: int = 4096 * 4096  # checked from the header, before decoding
    max_prompt_tokens: int | None = None  # image placeholder tokens included; None: the model's context
    allow_local_files: bool = False


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]  # the processor's format: image parts hold PIL images
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    think: bool = False


def _number(body: dict, name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"must be a finite number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        raise bad(name, f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def _integer(body: dict, name: str, low: int = -(2**63), high: int = 2**63 - 1) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise bad(name, f"must be in [{low}, {high}], got {value}")
    return value


def _flag(body: dict, name: str, where: str = "") -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(where + name, f"must be true or false, got {value!r}")
    return bool(value)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad("stop", "must be a non-empty string or a list of up to 4 non-empty strings")
    if max(map(len, stops)) > MAX_STOP_CHARS:
        raise bad("stop", f"each stop string may have at most {MAX_STOP_CHARS} characters")
    return stops


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise bad(unknown[0], f"not supported by this server (supported: {', '.join(sorted(FIELDS))})", "unsupported")
    for name, default in DEFAULT_ONLY.items():
        if body.get(name) not in (None, default):
            raise bad(name, f"only {str(default).lower()} is supported, got {body[name]!r}", "unsupported")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "required: the name GET /v1/models lists")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    max_tokens = _integer(body, "max_tokens", 1) if max_tokens is None else max_tokens
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad("stream_options", 'only {"include_usage": true|false}, and only with "stream": true')
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"enable_thinking"}:
        raise bad("chat_template_kwargs", 'only {"enable_thinking": true|false} is supported')
    return ChatRequest(
        model=model,
        messages=parse_messages(body.get("messages"), limits),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0, 2),
        top_p=_number(body, "top_p", 0, 1, low_open=True),
        stop=_stop(body.get("stop")),
        seed=_integer(body, "seed"),
        stream=stream,
        include_usage=_flag(options or {}, "include_usage", "stream_options."),
        think=_flag(kwargs, "enable_thinking", "chat_template_kwargs."),
    )


def parse_messages(messages: Any, limits: Limits) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "required: a non-empty list of {role, content} objects")
    images = [
        f"messages[{i}].content[{j}]"
        for i, m in enumerate(messages)
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for j, part in enumerate(m["content"])
        if isinstance(part, dict) and part.get("type") == "image_url"
    ]
    if len(images) > limits.max_images:  # counted before any is decoded
        raise bad(
            images[limits.max_images],
            f"{len(images)} images in the conversation; this server takes at most {limits.max_images} (--max-images)",
            "too_many_images",
        )
    return [_message(m, f"messages[{i}]", limits) for i, m in enumerate(messages)]


def _message(message: Any, where: str, limits: Limits) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise bad(where, "must be an object with role and content")
    role = ROLES.get(message.get("role"))
    if role is None:
        raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {message.get('role')!r}")
    content = message.get("content")
    if isinstance(content, str) or (content is None and role == "assistant"):
        return {"role": role, "content": content or ""}
    if not isinstance(content, list):
        raise bad(f"{where}.content", "must be a string or a list of text / image_url parts")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{at}.text", "must be a string")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            if role != "user":
                raise bad(at, f"images belong in user messages, not {message['role']}")
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise bad(f"{at}.image_url", 'must be {"url": "data:image/png;base64,..."}')
            parts.append({"type": "image", "image": load_image(url, f"{at}.image_url", limits)})
        else:
            raise bad(at, f'unsupported part type {kind!r}: use "text" or "image_url"')
    return {"role": role, "content": parts}


def load_image(url: str, where: str, limits: Limits) -> Image.Image:
    """A `data:` URL, or with `allow_local_files` a path / file:// URL; never a network fetch."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        mime = header[5:].split(";")[0]
        if not comma or not header.endswith(";base64") or (mime and not mime.startswith("image/")):
            raise bad(where, "a data URL must look like data:image/png;base64,<base64 bytes>", "invalid_image")
        if len(payload) * 3 // 4 > limits.max_image_bytes + 2:
            raise _too_large(where, len(payload) * 3 // 4, limits)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise bad(where, f"the data URL's base64 does not decode ({err})", "invalid_image") from None
    elif URL_SCHEME.match(url) and not url.startswith("file://"):
        scheme = url.split(":", 1)[0]
        raise bad(
            where,
            f"{scheme} URLs are refused: this server fetches nothing from the network; send the image as a data: URL",
            "remote_url",
        )
    else:
        path = Path(unquote(urlparse(url).path) if url.startswith("file://") else url).expanduser()
        if not limits.allow_local_files:
            raise bad(
                where,
                "local file paths are refused unless the server runs with --allow-local-files; send a data: URL",
                "local_file",
            )
        try:
            if not path.is_file():
                raise bad(where, f"no such file: {path}", "file_not_found")
            if path.stat().st_size > limits.max_image_bytes:
                raise _too_large(where, path.stat().st_size, limits)
            data = path.read_bytes()
        except OSError as err:  # a name too long, no permission, a file gone meanwhile: the request's fault
            raise bad(where, f"cannot read {path}: {err.strerror or err}", "file_not_found") from None
    if len(data) > limits.max_image_bytes:
        raise _too_large(where, len(data), limits)
    return open_image(data, where, limits)


def _too_large(where: str, size: int, limits: Limits) -> APIError:
    return bad(
        where,
        f"image is {size / 2**20:.1f} MiB; this server takes at most {limits.max_image_bytes / 2**20:.1f} MiB "
        "(--max-image-mb)",
        "image_too_large",
    )


def open_image(data: bytes, where: str, limits: Limits) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise bad(
            where, "not an image in a format PIL reads (PNG, JPEG, WebP, GIF, BMP, ...)", "invalid_image"
        ) from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types on foreign bytes; all mean "not an image"
        raise bad(where, f"not a readable image ({type(err).__name__}: {err})", "invalid_image") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise bad(
            where,
            f"image is {width}x{height} = {width * height:,} pixels; this server takes at most "
            f"{limits.max_image_pixels:,} (--max-image-pixels)",
            "image_too_large",
        )
    if width == 0 or height == 0:
        raise bad(where, f"image has zero size {width}x{height}", "invalid_image")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise bad(
            where,
            f"image is {width}x{height}: more than {MAX_ASPECT}:1 (resized to the tower's size along its short "
            "side it would take gigabytes); crop or pad it",
            "image_too_large",
        )
    try:
        image.load()
        return to_rgb(image)  # here, so that an image the processor could not convert is this request's 400
    except Exception as err:  # noqa: BLE001 - truncated or corrupt data fails in the decoder, with any type
        raise bad(where, f"the image data is damaged ({type(err).__name__}: {err})", "invalid_image") from None
