import json
import os

import pytest
import torch
from safetensors.torch import load_file

from vlm_peft import attach
from vlm_peft.data import feature_cache as fc_module
from vlm_peft.data.collator import VLMCollator
from vlm_peft.data.feature_cache import FeatureCache, build_cache
from vlm_peft.data.rows import load_rows
from vlm_peft.model.vision import VisionTower, build_vision_model

from .conftest import make_image


@pytest.fixture()
def rows(tmp_path):
    colours = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (250, 250, 0)]
    for i, colour in enumerate(colours):
        make_image(colour, size=(40 + i, 30)).save(tmp_path / f"{i}.png")
    data = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A shape."},
            ],
            "images": [f"{i % 4}.png"],
        }
        for i in range(6)  # images 0 and 1 appear twice: deduplicated
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return load_rows(tmp_path / "d.jsonl")


@pytest.fixture()
def tower(vlm_cfg):
    torch.manual_seed(0)
    return VisionTower(build_vision_model(vlm_cfg.vision_config))


def test_cached_features_give_the_same_loss(rows, tower, processor, llm, vlm_cfg, tmp_path):
    counts = build_cache(
        rows, tmp_path / "cache", tower, processor.image_processor, image_root=tmp_path, dtype="float32"
    )
    assert counts == {"images_seen": 6, "distinct_new": 4, "cached_total": 4}
    cache = FeatureCache(tmp_path / "cache")
    cache.check(tower, processor.image_processor)
    batch = [rows[i] for i in range(6)]
    with_images = VLMCollator(processor, tmp_path)(batch)
    with_cache = VLMCollator(processor, tmp_path, features=cache)(batch)
    assert "pixel_values" not in with_cache and with_cache["image_features"].shape == (6, 16, 32)
    model = attach(llm, vlm_cfg, vision=tower)
    with torch.no_grad():
        a = model(**with_images).loss
        b = model(**with_cache).loss
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_interrupted_cache_run_resumes(rows, tower, processor, tmp_path, monkeypatch):
    real_save = fc_module.save_file
    calls = []

    def dies_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(fc_module, "save_file", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_cache(rows, tmp_path / "cache", tower, processor.image_processor, image_root=tmp_path, shard_size=2)
    assert len(FeatureCache(tmp_path / "cache")) == 2  # the finished shard is kept
    monkeypatch.setattr(fc_module, "save_file", real_save)
    counts = build_cache(rows, tmp_path / "cache", tower, processor.image_processor, image_root=tmp_path, shard_size=2)
    assert counts["distinct_new"] == 2 and counts["cached_total"] == 4
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_temporaries_of_a_killed_cache_run_are_removed(rows, tower, processor, tmp_path, caplog):
    import logging

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".shard-00000.safetensors.partial-99999999").write_bytes(b"half")  # no such process
    (cache / f".index.json.partial-{os.getppid()}").write_text("{")  # a live process's: kept
    with caplog.at_level(logging.WARNING):
        build_cache(rows, cache, tower, processor.image_processor, image_root=tmp_path, shard_size=2)
    assert not (cache / ".shard-00000.safetensors.partial-99999999").exists() and "died" in caplog.text
    assert (cache / f".index.json.partial-{os.getppid()}").exists()


def test_cache_of_another_tower_or_image_is_refused(rows, tower, processor, vlm_cfg, tmp_path):
    build_cache(rows, tmp_path / "cache", tower, processor.image_processor, image_root=tmp_path)
    other = VisionTower(build_vision_model(vlm_cfg.vision_config))
    with pytest.raises(ValueError, match="different vision tower or preprocessing"):
        FeatureCache(tmp_path / "cache").check(other, processor.image_processor)
    with pytest.raises(ValueError, match="another vision tower"):
        build_cache(rows, tmp_path / "cache", other, processor.image_processor, image_root=tmp_path)
    make_image((1, 2, 3)).save(tmp_path / "new.png")
    with pytest.raises(ValueError, match="not in the feature cache"):
        FeatureCache(tmp_path / "cache").features(["new.png"], tmp_path, "d.jsonl:9")
    with pytest.raises(FileNotFoundError, match="not a feature cache"):
        FeatureCache(tmp_path)


@pytest.mark.slow
def test_training_from_the_cache_equals_training_from_images(tmp_path, monkeypatch):
    from data_tools.synth import make_shapes_dataset
    from vlm_peft.training.cache import cache_stage_features
    from vlm_peft.training.recipe import load_recipe
    from vlm_peft.training.stages import train

    shapes = make_shapes_dataset(tmp_path / "shapes", seed=2, align_train=48, align_eval=8, sft_train=8, sft_eval=8)
    sets = [
        f"llm.tokenizer={shapes / 'tokenizer'}",
        f"stages.align.data.train={shapes / 'align_train.jsonl'}",
        "stages.align.data.eval=null",
        "stages.align.args.max_steps=3",
        "stages.align.args.per_device_train_batch_size=8",
    ]
    plain = load_recipe("recipes/demo.yaml", [f"output_dir={tmp_path / 'run'}", *sets])
    train(plain, stage="align")
    a = load_file(plain.stage_dir("align") / "projector.safetensors")
    cached = load_recipe(
        "recipes/demo.yaml",
        [f"output_dir={tmp_path / 'run'}", *sets, f"stages.align.data.features={tmp_path / 'features'}"],
    )
    assert cache_stage_features(cached, "align", dtype="float32")["distinct_new"] == 48

    def no_tower(self, pixel_values):
        raise AssertionError("the vision tower ran although the stage reads a feature cache")

    monkeypatch.setattr(VisionTower, "forward", no_tower)
    train(cached, stage="align", overwrite=True)  # same output_dir: same random base and tower
    b = load_file(cached.stage_dir("align") / "projector.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert (cached.stage_dir("align") / "metrics.json").is_file()


def test_unreadable_or_oversized_images_name_their_row(rows, tower, processor, tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"d.jsonl:3: image '2.png' cannot be read"):
        build_cache(rows, tmp_path / "cache", tower, processor.image_processor, image_root=tmp_path)
    make_image((1, 2, 3), size=(40, 30)).save(tmp_path / "2.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # every test image is 1,200+ pixels
    with pytest.raises(ValueError, match=r"d.jsonl:1: image <bytes> is 40x30 = 1,200 pixels, over the limit"):
        build_cache(rows, tmp_path / "cache", tower, processor.image_processor, image_root=tmp_path)
