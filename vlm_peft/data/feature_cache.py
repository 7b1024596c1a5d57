"""A cache of frozen-tower patch features, so training skips the vision tower.

Every distinct image (by SHA-256 of its bytes) is encoded once; features go to safetensors
shards, and `index.json` maps hashes to (shard, row) and records the fingerprint of the tower
and preprocessing that made them: a cache made by another tower is refused, not used. Shards
are written whole (temporary name, then rename) and the index after each shard, so an
interrupted run resumes with the shards it finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..atomic import remove, stale_temporaries
from ..model.vision import VisionTower
from .processor import to_rgb
from .rows import WHERE, open_image

logger = logging.getLogger(__name__)

INDEX = "index.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def image_bytes(ref: str | dict[str, Any], image_root: str | Path | None) -> bytes:
    if isinstance(ref, dict) and ref.get("bytes"):
        return ref["bytes"]
    name = ref.get("path") if isinstance(ref, dict) else ref
    path = Path(name)
    if not path.is_absolute() and image_root is not None:
        path = Path(image_root) / path
    return path.read_bytes()


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(tower: VisionTower, image_processor: Any) -> str:
    """Identity of (tower weights, feature layer, preprocessing): features from another differ."""
    h = hashlib.sha256()
    h.update(json.dumps(tower.model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(tower.feature_layer).encode())
    h.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(tower.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Read side: `features(list of image refs) -> [images, patches, width]`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / INDEX
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {directory} is not a feature cache (vlm-peft data cache-features)."
            )
        self.index = json.loads(path.read_text())
        self._handles: dict[str, Any] = {}

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]

    def check(self, tower: VisionTower, image_processor: Any) -> None:
        if fingerprint(tower, image_processor) != self.fingerprint:
            raise ValueError(
                f"{self.directory} was made by a different vision tower or preprocessing "
                f"({self.index.get('vision')}, feature layer {self.index.get('feature_layer')}); rebuild it with "
                "`vlm-peft data cache-features` for this recipe."
            )

    def __len__(self) -> int:
        return len(self.index["entries"])

    def get(self, digest: str, where: str = "") -> torch.Tensor:
        entry = self.index["entries"].get(digest)
        if entry is None:
            raise ValueError(
                f"{where}: image not in the feature cache {self.directory}; rerun `vlm-peft data cache-features` on "
                "this data (it adds only what is missing)."
            )
        shard, row = entry
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.directory / shard), "pt")
        return self._handles[shard].get_slice("features")[row]

    def features(self, refs: Iterable[str | dict], image_root: str | Path | None, where: str = "") -> torch.Tensor:
        return torch.stack([self.get(content_hash(image_bytes(ref, image_root)), where) for ref in refs])

    def __getstate__(self) -> dict:  # dataloader workers reopen the shards themselves
        return {"directory": self.directory, "index": self.index, "_handles": {}}


def build_cache(
    rows: Iterable[dict[str, Any]],
    out_dir: str | Path,
    tower: VisionTower,
    image_processor: Any,
    *,
    image_root: str | Path | None = None,
    batch_size: int = 32,
    shard_size: int = 2048,
    dtype: str = "float16",
    source: str | None = None,
) -> dict[str, int]:
    """Encode every distinct image of `rows` not yet in the cache at `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path, _ in stale_temporaries(out, r"\..+\.partial-(\d+)"):  # from a run that was killed mid-write
        remove(path)
        logger.warning("removed %s, left by a cache-features run that died", path)
    stamp = fingerprint(tower, image_processor)
    path = out / INDEX
    if path.is_file():
        index = json.loads(path.read_text())
        if index["fingerprint"] != stamp:
            raise ValueError(f"{out} holds features of another vision tower or preprocessing; use a new dir.")
    else:
        index = {
            "fingerprint": stamp,
            "vision": source,
            "feature_layer": tower.feature_layer,
            "dtype": dtype,
            "shape": [tower.num_patches, tower.hidden_size],
            "shards": [],
            "entries": {},
        }
    todo: dict[str, tuple[bytes, str]] = {}
    seen = 0
    for i, row in enumerate(tqdm(rows, desc="hashing images", unit="row")):
        where = row.get(WHERE) or f"row {i}"
        for ref in row.get("images") or []:
            try:
                data = image_bytes(ref, image_root)
            except OSError as err:
                raise FileNotFoundError(
                    f"{where}: image {ref!r} cannot be read ({err}; image root: {image_root})."
                ) from None
            seen += 1
            digest = content_hash(data)
            if digest not in index["entries"]:
                todo.setdefault(digest, (data, where))
    pending = list(todo.items())
    bar = tqdm(total=len(pending), desc="encoding images", unit="img")
    for start in range(0, len(pending), shard_size):
        chunk = pending[start : start + shard_size]
        feats = []
        for b in range(0, len(chunk), batch_size):
            # As training opens them: a broken or oversized image names its row.
            images = [to_rgb(open_image({"bytes": data, "path": None}, None, where)) for _, (data, where) in
                      chunk[b : b + batch_size]]  # fmt: skip
            pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
            feats.append(tower(pixels).to(DTYPES[dtype]).cpu())
            bar.update(len(images))
        name = f"shard-{len(index['shards']):05d}.safetensors"
        tmp = out / f".{name}.partial-{os.getpid()}"
        save_file({"features": torch.cat(feats).contiguous()}, str(tmp), metadata={"format": "pt"})
        tmp.rename(out / name)
        index["shards"].append(name)
        for row_index, (digest, _) in enumerate(chunk):
            index["entries"][digest] = [name, row_index]
        tmp_index = out / f".{INDEX}.partial-{os.getpid()}"
        tmp_index.write_text(json.dumps(index))
        tmp_index.rename(path)
    bar.close()
    return {"images_seen": seen, "distinct_new": len(pending), "cached_total": len(index["entries"])}
