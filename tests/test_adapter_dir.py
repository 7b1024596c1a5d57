import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from vlm_peft import VLMConfig, VLMProcessor, add_lora, attach, detach, save_adapter
from vlm_peft.model.checkpoint import PROJECTOR_FILE
from vlm_peft.tiny import tiny_clip_config, tiny_image_processor, tiny_qwen3

from .conftest import make_image, user_turn


@pytest.fixture()
def base_dir(llm, tmp_path):
    path = tmp_path / "base"
    llm.save_pretrained(path)
    return path


def fresh_base(base_dir):
    """What another process would load: the base from disk, nothing shared in memory."""
    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


def batch_for(processor):
    conv = user_turn("What is this?") + [{"role": "assistant", "content": "A red circle."}]
    return processor(text=processor.apply_chat_template(conv), images=[make_image((200, 30, 10))])


def trained(model, processor, steps=3):
    """A few optimizer steps so that saved weights differ from any fresh init."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = batch_for(processor)
    model.train()
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("lora", [False, True])
def test_save_then_attach_to_fresh_base_gives_equal_logits(base_dir, processor, vlm_cfg, tmp_path, lora):
    model = attach(fresh_base(base_dir), vlm_cfg)
    if lora:
        model = add_lora(model, r=4)
    model = trained(model, processor)
    batch = batch_for(processor)
    with torch.no_grad():
        expected = model(**batch).logits
    out = save_adapter(model, tmp_path / "adapter", processor=processor)
    files = {p.name for p in out.iterdir()}
    assert {"vlm_config.json", PROJECTOR_FILE, "vision", "tokenizer.json", "processor_config.json"} <= files
    assert ({"adapter_config.json", "adapter_model.safetensors"} <= files) == lora
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    saved = json.loads((out / "vlm_config.json").read_text())
    assert saved["base_fingerprint"]["hidden_size"] == 64 and saved["vision_model"] == "./vision"

    reloaded = attach(fresh_base(base_dir), out)
    proc = VLMProcessor.from_pretrained(out)
    with torch.no_grad():
        got = reloaded.eval()(**batch_for(proc)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert type(reloaded).__name__ == ("PeftModelForCausalLM" if lora else "Qwen3ForCausalLM")
    assert not any(p.requires_grad for p in reloaded.parameters())
    trainable = attach(detach(reloaded), out, is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "vlm_projector" in n)


@pytest.mark.parametrize("tokens", [16, 4])
def test_grid_token_counts_round_trip(base_dir, tokenizer, tmp_path, tokens):
    """The fixtures' 8 tokens are off the 16-patch grid; one token per patch and a 2x2 merge save and
    reload too, with open gates (trained) so that every part of the projector counts."""
    processor = VLMProcessor(tiny_image_processor(32), tokenizer, num_image_tokens=tokens)
    cfg = VLMConfig(vision_model=None, vision_config=tiny_clip_config(), num_image_tokens=tokens,
                    projector_heads=4, projector_dropout=0.0, image_token_id=processor.image_token_id)  # fmt: skip
    model = attach(fresh_base(base_dir), cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate_attn", "gate_ffn")):
                param.fill_(0.5)
    model = trained(model, processor)
    with torch.no_grad():
        expected = model(**batch_for(processor)).logits
    out = save_adapter(model, tmp_path / "adapter", processor=processor)
    with torch.no_grad():
        got = attach(fresh_base(base_dir), out).eval()(**batch_for(VLMProcessor.from_pretrained(out))).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_revision_2_projector_of_the_early_layout_is_refused_with_a_hint(base_dir, vlm_cfg, tmp_path):
    out = forget_checksums(save_adapter(attach(fresh_base(base_dir), vlm_cfg), tmp_path / "adapter"))
    weights = load_file(out / PROJECTOR_FILE)
    # Before the per-patch layout: no per-patch embedding and no merge Linear.
    early = {k: v for k, v in weights.items() if not k.startswith(("patch_embed", "merge_proj"))}
    save_file(early, out / PROJECTOR_FILE)
    with pytest.raises(ValueError, match=r"missing keys \['merge_proj.bias', 'merge_proj.weight', 'patch_embed'\].*"
                                         r"before 2026-12-02's per-patch layout: retrain it"):  # fmt: skip
        attach(fresh_base(base_dir), out)


def test_wrong_base_is_refused_naming_both(base_dir, processor, vlm_cfg, tmp_path, tokenizer):
    out = save_adapter(attach(fresh_base(base_dir), vlm_cfg), tmp_path / "adapter")
    other = tiny_qwen3(len(tokenizer), hidden_size=32)
    with pytest.raises(ValueError, match=r"hidden_size: adapter 64 vs model 32"):
        attach(other, out)
    deeper = tiny_qwen3(len(tokenizer), layers=3)
    with pytest.raises(ValueError, match=r"num_hidden_layers: adapter 2 vs model 3"):
        attach(deeper, out)
    bigger_vocab = tiny_qwen3(len(tokenizer) + 10)
    with pytest.raises(ValueError, match=r"vocab_size: adapter \d+ vs model \d+"):
        attach(bigger_vocab, out)
    assert not hasattr(other, "vlm_projector") and not hasattr(other, "_vlm_state")


def forget_checksums(directory):
    """As a dir saved before checksums, or assembled by hand: the checks behind them still hold."""
    cfg = json.loads((directory / "vlm_config.json").read_text())
    cfg["checksums"] = {}
    (directory / "vlm_config.json").write_text(json.dumps(cfg))
    return directory


def test_projector_key_mismatch_is_an_error(base_dir, vlm_cfg, tmp_path):
    out = forget_checksums(save_adapter(attach(fresh_base(base_dir), vlm_cfg), tmp_path / "adapter"))
    weights = load_file(out / PROJECTOR_FILE)
    missing = dict(weights)
    missing.pop("slot_embed")
    save_file(missing, out / PROJECTOR_FILE)
    with pytest.raises(ValueError, match=r"missing keys \['slot_embed'\]"):
        attach(fresh_base(base_dir), out)
    save_file(weights | {"extra.weight": torch.zeros(2)}, out / PROJECTOR_FILE)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        attach(fresh_base(base_dir), out)
    save_file(weights | {"slot_embed": torch.zeros(3, 64)}, out / PROJECTOR_FILE)
    with pytest.raises(ValueError, match="slot_embed: file \\(3, 64\\) vs model"):
        attach(fresh_base(base_dir), out)
    (out / PROJECTOR_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="projector"):
        attach(fresh_base(base_dir), out)


def test_inconsistent_lora_dir_is_an_error(base_dir, processor, vlm_cfg, tmp_path):
    model = trained(add_lora(attach(fresh_base(base_dir), vlm_cfg), r=4), processor, steps=1)
    out = forget_checksums(save_adapter(model, tmp_path / "adapter"))
    weights = load_file(out / PROJECTOR_FILE)
    save_file({k: v + 1 for k, v in weights.items()}, out / PROJECTOR_FILE)
    base = fresh_base(base_dir)
    keys = set(base.state_dict())
    with pytest.raises(ValueError, match="inconsistent"):
        attach(base, out)
    # The failed attach left nothing behind: no LoRA layers, no projector, no hooks.
    assert set(base.state_dict()) == keys and not base._forward_pre_hooks
    assert attach(base, save_adapter(attach(fresh_base(base_dir), vlm_cfg), tmp_path / "ok")) is base


def test_bad_config_files(tmp_path, llm):
    with pytest.raises(FileNotFoundError, match="not a vlm-peft adapter"):
        attach(llm, tmp_path)
    (tmp_path / "vlm_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        attach(llm, tmp_path)
    (tmp_path / "vlm_config.json").write_text(json.dumps({"vision_config": {}, "projektor": "mlp"}))
    with pytest.raises(ValueError, match=r"unknown VLMConfig keys \['projektor'\]"):
        attach(llm, tmp_path)
    (tmp_path / "vlm_config.json").write_text(
        json.dumps(VLMConfig(vision_config={}).to_dict() | {"format_version": 99})
    )
    with pytest.raises(ValueError, match="upgrade vlm-peft"):
        VLMConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("full_clip", [False, True])
def test_referenced_vision_tower_is_not_copied(base_dir, processor, vlm_cfg, tmp_path, full_clip):
    import dataclasses

    from transformers import CLIPConfig, CLIPModel

    from vlm_peft.model.vision import build_vision_model

    tower_dir = tmp_path / "clip"
    if full_clip:  # a whole CLIP checkpoint (text + vision), as on the hub
        vision = {k: v for k, v in vlm_cfg.vision_config.items() if k != "model_type"}
        CLIPModel(
            CLIPConfig(
                vision_config=vision,
                text_config={
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 4,
                },
            )
        ).save_pretrained(tower_dir)
    else:
        build_vision_model(vlm_cfg.vision_config).save_pretrained(tower_dir)
    cfg = dataclasses.replace(vlm_cfg, vision_model=str(tower_dir), vision_config=None)
    model = attach(fresh_base(base_dir), cfg)
    out = save_adapter(model, tmp_path / "adapter")
    assert not (out / "vision").exists()
    assert json.loads((out / "vlm_config.json").read_text())["vision_model"] == str(tower_dir)
    batch = batch_for(processor)
    with torch.no_grad():
        torch.testing.assert_close(attach(fresh_base(base_dir), out)(**batch).logits, model(**batch).logits)


def test_tower_object_given_to_attach_is_the_one_saved(base_dir, processor, vlm_cfg, tmp_path):
    from vlm_peft.model.vision import build_vision_model

    torch.manual_seed(7)
    tower = build_vision_model(vlm_cfg.vision_config)  # not the tower the config would build
    model = attach(fresh_base(base_dir), vlm_cfg, vision=tower)
    out = save_adapter(model, tmp_path / "adapter")
    batch = batch_for(processor)
    with torch.no_grad():
        torch.testing.assert_close(attach(fresh_base(base_dir), out)(**batch).logits, model(**batch).logits)


@pytest.fixture()
def lora_dir(llm, vlm_cfg, processor, tmp_path):
    llm.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = add_lora(attach(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), vlm_cfg), r=4)
    return save_adapter(model, tmp_path / "adapter", processor=processor), tmp_path / "base"


@pytest.mark.parametrize(
    "damage, error, match",
    [
        ("truncate projector", ValueError, r"projector.safetensors changed since it was saved"),
        ("truncate projector, no checksums", ValueError, r"projector.safetensors is not a readable safetensors file"),
        ("flip a byte of the projector", ValueError, r"projector.safetensors changed since it was saved"),
        ("remove adapter_model", FileNotFoundError, r"adapter_model.safetensors is missing"),
        ("remove adapter_config", FileNotFoundError, r"adapter_config.json is missing"),
        ("remove adapter_config, no checksums", FileNotFoundError, r"adapter_config.json is missing beside adapter_mo"),
        ("flip a byte of the LoRA", ValueError, r"adapter_model.safetensors changed since it was saved"),
        ("half of adapter_config, no checksums", ValueError, r"adapter_config.json is not valid JSON"),
        ("half of adapter_config", ValueError, r"adapter_config.json changed since it was saved"),
    ],
)
def test_damaged_adapter_dirs_name_the_file(lora_dir, damage, error, match):
    from transformers import AutoModelForCausalLM

    directory, base = lora_dir
    target = directory / (PROJECTOR_FILE if "projector" in damage else "adapter_model.safetensors")
    if damage.startswith("truncate"):
        target.write_bytes(target.read_bytes()[:100])
    elif damage.startswith("flip"):
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF  # inside the tensor data: the file still parses
        target.write_bytes(bytes(data))
    elif damage == "remove adapter_model":
        target.unlink()
    elif damage.startswith("half of adapter_config"):
        config = directory / "adapter_config.json"
        config.write_text(config.read_text()[:40])
    else:
        (directory / "adapter_config.json").unlink()
    if "no checksums" in damage:
        forget_checksums(directory)
    llm = AutoModelForCausalLM.from_pretrained(base)
    with pytest.raises(error, match=match):
        attach(llm, directory)
    assert not hasattr(llm, "vlm_projector")  # nothing left attached


def test_saved_checksums_cover_the_tensor_files(lora_dir):
    from vlm_peft.model.checkpoint import sha256

    directory, _ = lora_dir
    saved = json.loads((directory / "vlm_config.json").read_text())["checksums"]
    names = (PROJECTOR_FILE, "adapter_model.safetensors", "adapter_config.json", "vision/model.safetensors")
    assert saved == {name: sha256(directory / name) for name in names}  # the tiny tower is random: saved too
