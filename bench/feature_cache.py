"""Feature cache at CLIP ViT-B/16 size: caching throughput, and a stage-1 step with cached
features vs with images, side by side (random weights; nothing is downloaded).

Run: `python -m bench.feature_cache` (about a minute on 2 cores) or `--quick` (toy sizes, for CI).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from vlm_peft import VLMConfig, VLMProcessor, attach
from vlm_peft.data.collator import VLMCollator
from vlm_peft.data.feature_cache import FeatureCache, build_cache
from vlm_peft.data.rows import normalize_row
from vlm_peft.model.vision import VisionTower, build_vision_model
from vlm_peft.tiny import tiny_image_processor, tiny_qwen3_config, tiny_tokenizer


def sizes(quick: bool) -> dict:
    if quick:
        return dict(
            image=32,
            patch=8,
            width=32,
            layers=1,
            heads=4,
            llm_hidden=64,
            llm_layers=2,
            images=16,
            batch=4,
            n=8,
            repeats=3,
        )
    return dict(
        image=224,
        patch=16,
        width=768,
        layers=12,
        heads=12,
        llm_hidden=1024,
        llm_layers=4,
        images=64,
        batch=8,
        n=196,
        repeats=5,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    s = sizes(parser.parse_args(argv).quick)
    torch.manual_seed(0)
    vision_cfg = {
        "model_type": "clip_vision_model",
        "hidden_size": s["width"],
        "intermediate_size": 4 * s["width"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "image_size": s["image"],
        "patch_size": s["patch"],
    }
    tower = VisionTower(build_vision_model(vision_cfg))
    tokenizer = tiny_tokenizer(["What is this? A red circle."] * 10)
    processor = VLMProcessor(tiny_image_processor(s["image"]), tokenizer, num_image_tokens=s["n"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        for i in range(s["images"]):
            Image.new("RGB", (320, 240), ((i * 37) % 256, (i * 91) % 256, 128)).save(root / f"{i}.jpg")
            rows.append(
                normalize_row(
                    {
                        "messages": [
                            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                            {"role": "assistant", "content": "A red circle."},
                        ],
                        "images": [f"{i}.jpg"],
                    },
                    f"row {i}",
                )
            )
        start = time.perf_counter()
        build_cache(rows, root / "cache", tower, processor.image_processor, image_root=root, batch_size=s["batch"])
        cache_s = time.perf_counter() - start
        cache = FeatureCache(root / "cache")

        llm_cfg = tiny_qwen3_config(
            len(tokenizer),
            hidden_size=s["llm_hidden"],
            layers=s["llm_layers"],
            num_attention_heads=16 if s["llm_hidden"] >= 1024 else 4,
            num_key_value_heads=8 if s["llm_hidden"] >= 1024 else 2,
            head_dim=128 if s["llm_hidden"] >= 1024 else 16,
            intermediate_size=3 * s["llm_hidden"],
        )
        from transformers import Qwen3ForCausalLM

        llm = Qwen3ForCausalLM(llm_cfg)
        cfg = VLMConfig(
            vision_config=vision_cfg,
            num_image_tokens=s["n"],
            projector_heads=8 if s["width"] > 64 else 4,
            projector_dropout=0.0,
            image_token_id=processor.image_token_id,
        )
        model = attach(llm, cfg, vision=tower).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        collators = {"images": VLMCollator(processor, root), "cached": VLMCollator(processor, root, features=cache)}
        batch_rows = rows[: s["batch"]]

        def step(collator: VLMCollator) -> float:
            t = time.perf_counter()
            batch = collator(batch_rows)
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            return time.perf_counter() - t

        for collator in collators.values():
            step(collator)
        times = {name: [] for name in collators}
        for _ in range(s["repeats"]):
            for name, collator in collators.items():
                times[name].append(step(collator))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"vision tower: CLIP-like, {s['image']} px / patch {s['patch']}, width {s['width']}, {s['layers']} layers;"
        f" LLM: Qwen3 hidden {s['llm_hidden']}, {s['llm_layers']} layers; batch {s['batch']}, N={s['n']}; 2 threads"
    )
    print(f"cache build: {s['images']} images in {cache_s:.1f} s = {s['images'] / cache_s:.1f} images/s")
    for name, values in times.items():
        print(
            f"stage-1 step with {name:<7}: median {med[name] * 1e3:8.1f} ms  (min {min(values) * 1e3:.1f},"
            f" max {max(values) * 1e3:.1f}, n={len(values)})"
        )
    print(f"ratio images / cached: {med['images'] / med['cached']:.2f}x")


if __name__ == "__main__":
    main()
