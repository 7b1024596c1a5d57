import json
import logging
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from vlm_peft import add_lora, attach, load, merge, save_adapter
from vlm_peft.model.attach import vlm_config
from vlm_peft.model.checkpoint import PROJECTOR_FILE

from .conftest import make_image, user_turn


@pytest.fixture()
def adapter(llm, processor, vlm_cfg, tmp_path):
    """An adapter whose LoRA and projector differ from any fresh init."""
    llm.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = add_lora(attach(base, vlm_cfg), r=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    return save_adapter(model, tmp_path / "adapter", processor=processor)


def inputs(processor, text="What is this?"):
    prompt = processor.apply_chat_template(user_turn(text), add_generation_prompt=True)
    return processor(text=prompt, images=[make_image((200, 40, 10))])


def test_merged_equals_unmerged(adapter, processor, tmp_path):
    unmerged, _ = load(adapter)
    merged_dir = merge(adapter, tmp_path / "merged")
    merged, merged_processor = load(merged_dir)
    assert type(merged).__name__ == "Qwen3ForCausalLM"  # LoRA folded in: no PEFT wrapper
    text = processor.tokenizer(["A red circle. What is this?"], return_tensors="pt")
    image = inputs(processor)
    with torch.no_grad():
        for batch in (text, image):
            delta = (merged(**batch).logits - unmerged(**batch).logits).abs().max().item()
            assert delta <= 1e-4, delta
            print(f"max |delta logit| merged vs unmerged: {delta:.2e}")
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert (
        merged.generate(**inputs(merged_processor), **kwargs).tolist() == unmerged.generate(**image, **kwargs).tolist()
    )


def test_merged_dir_is_a_plain_transformers_model(adapter, tmp_path, caplog):
    out = merge(adapter, tmp_path / "merged")
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "vlm_config.json",
        PROJECTOR_FILE,
        "vision",
        "README.md",
        "tokenizer.json",
        "processor_config.json",
        "generation_config.json",
    } <= files
    assert "adapter_config.json" not in files and not list(out.rglob("*.bin"))
    with caplog.at_level(logging.WARNING):
        text_model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert "not used" not in caplog.text and "newly initialized" not in caplog.text
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not any(k.startswith("vlm_projector") for k in f.keys())
    assert "vlm-peft" in (out / "README.md").read_text()
    ids = torch.tensor([[1, 2, 3]])
    assert text_model(input_ids=ids).logits.shape[-1] == text_model.config.vocab_size


def test_sharded_and_bf16(adapter, processor, tmp_path):
    reference = load(merge(adapter, tmp_path / "one"))[0]
    sharded = merge(adapter, tmp_path / "sharded", max_shard_size="50KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _ = load(sharded)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs(processor)).logits, reference(**inputs(processor)).logits)
    half = merge(adapter, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(half / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model, _ = load(half)
    assert next(model.model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(**inputs(processor)).logits).all()


def test_failed_merge_leaves_nothing_and_existing_dirs_are_kept(adapter, tmp_path, monkeypatch):
    from vlm_peft.data import processor as processor_module

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    out = tmp_path / "merged"
    monkeypatch.setattr(processor_module.VLMProcessor, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        merge(adapter, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "merged" in p.name]
    monkeypatch.undo()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        merge(adapter, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge(adapter, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_stage1_adapter_without_lora_merges_and_attaches(llm, processor, vlm_cfg, tmp_path):
    llm.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    stage1 = save_adapter(attach(base, vlm_cfg), tmp_path / "stage1", processor=processor)
    merged, _ = load(merge(stage1, tmp_path / "merged"))
    model, _ = load(stage1)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs(processor)).logits, model(**inputs(processor)).logits)


@pytest.mark.parametrize("where", ["adapter", "adapter/sub", ".", "base", "base/x"])
def test_merge_refuses_to_write_over_its_own_sources(adapter, tmp_path, where):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="cannot be, contain or lie inside the"):
        merge(adapter, tmp_path / where, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _text_model_ok(path):
    return AutoModelForCausalLM.from_pretrained(path) is not None and (path / "vlm_config.json").is_file()


KILL_SCRIPT = """
import os, shutil, sys
from vlm_peft.serving import merge as m
if sys.argv[3] == "two-renames":
    m.exchange = lambda a, b: False
    rename = m.Path.rename
    def dying_rename(self, target):
        result = rename(self, target)
        if ".old-" in str(target):
            os._exit(9)  # killed between the two renames
        return result
    m.Path.rename = dying_rename
else:
    rmtree = shutil.rmtree
    def dying_rmtree(path, *a, **k):
        if ".partial-" in str(path) and os.path.isdir(os.path.join(path, "vision")):
            os._exit(9)  # killed right after the exchange, before the old model is removed
        return rmtree(path, *a, **k)
    m.shutil.rmtree = dying_rmtree
m.merge(sys.argv[1], sys.argv[2], overwrite=True)
"""


@pytest.mark.parametrize("swap", ["exchange", "two-renames"])
def test_merge_overwrite_killed_mid_swap_leaves_or_restores_a_complete_model(adapter, tmp_path, caplog, swap):
    import subprocess
    import sys

    out = merge(adapter, tmp_path / "merged")
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(adapter), str(out), swap], timeout=300, check=False)
    assert done.returncode == -9 or done.returncode == 9
    stale = sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.name.startswith(".merged."))
    if swap == "exchange":
        assert _text_model_ok(out) and stale == [".merged.partial"]  # OUT named a complete model throughout
    else:
        assert not out.exists() and stale == [".merged.old", ".merged.partial"]  # a kill between two renames
    with caplog.at_level(logging.WARNING):
        merge(adapter, out, overwrite=True)
    assert _text_model_ok(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    assert ("restored it from" if swap == "two-renames" else "removed .merged.partial-") in caplog.text


def test_a_full_disk_during_merge_is_a_clean_cli_error(adapter, tmp_path, monkeypatch, caplog):

    from safetensors import SafetensorError

    from vlm_peft.cli import main
    from vlm_peft.serving import merge as merge_module

    def full(*args, **kwargs):  # what safetensors raises on a full disk: not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(merge_module, "save_file", full)
    with caplog.at_level(logging.ERROR):
        assert main(["merge", str(adapter), str(tmp_path / "merged")]) == 2
    assert "No space left on device" in caplog.text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")] and not (tmp_path / "merged").exists()


def test_merge_overwrite_onto_a_link_replaces_the_link(adapter, tmp_path):
    real = merge(adapter, tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    out = merge(adapter, link, overwrite=True)
    assert not out.is_symlink() and _text_model_ok(out) and _text_model_ok(real)  # the link's target is kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_adapter_saved_before_revision_2_loads_and_merges_as_revision_1(llm, processor, vlm_cfg, tmp_path):
    """A vlm_config.json without `projector_revision` (written before revision 2): the slot projector it
    was trained with is rebuilt, gives the logits it gave, and the merged dir keeps revision 1."""
    llm.save_pretrained(tmp_path / "base")
    model = add_lora(
        attach(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), replace(vlm_cfg, projector_revision=1)), r=4
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
        expected = model.eval()(**inputs(processor)).logits
    adapter = save_adapter(model, tmp_path / "adapter", processor=processor)
    saved = json.loads((adapter / "vlm_config.json").read_text())
    del saved["projector_revision"]
    (adapter / "vlm_config.json").write_text(json.dumps(saved))

    reloaded, _ = load(adapter)
    assert vlm_config(reloaded).projector_revision == 1
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs(processor)).logits, expected, rtol=0, atol=1e-6)
    merged_dir = merge(adapter, tmp_path / "merged")
    assert json.loads((merged_dir / "vlm_config.json").read_text())["projector_revision"] == 1
    merged, _ = load(merged_dir)
    with torch.no_grad():
        assert (merged(**inputs(processor)).logits - expected).abs().max().item() <= 1e-4
