"""`vlm-peft export --format llava`: the exported LlavaForConditionalGeneration + AutoProcessor give the logits and
greedy answers of the vlm-peft model they come from; what LLaVA cannot express is refused."""

import json
import logging

import jinja2
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    SiglipImageProcessorPil,
)
from transformers.utils.chat_template_utils import _compile_jinja_template

from vlm_peft import VLMConfig, VLMProcessor, add_lora, attach, load, merge, save_adapter
from vlm_peft.cli import main
from vlm_peft.serving.export import export
from vlm_peft.tiny import tiny_clip_config, tiny_image_processor, tiny_qwen3, tiny_siglip_config

from .conftest import make_image

PATCHES = 16  # (32 px / 8 px)^2: the mlp projector emits one token per patch
TOWERS = {"clip": tiny_clip_config, "siglip": tiny_siglip_config}


def image_processor(tower):
    return tiny_image_processor(32) if tower == "clip" else SiglipImageProcessorPil(size={"height": 32, "width": 32})


def make_adapter(root, tokenizer, tower="clip", feature_layer=-1, projector="mlp", tied=True):
    """An adapter with LoRA and a projector that differ from any fresh init (LoRA's B is zero at init)."""
    processor = VLMProcessor(image_processor(tower), tokenizer, num_image_tokens=PATCHES)
    cfg = VLMConfig(
        vision_model=None,
        vision_config=TOWERS[tower](),
        projector=projector,
        num_image_tokens=processor.num_image_tokens,
        projector_heads=4,
        projector_dropout=0.0,
        vision_feature_layer=feature_layer,
        image_token_id=processor.image_token_id,
    )
    torch.manual_seed(0)
    tiny_qwen3(len(tokenizer), tie_word_embeddings=tied).save_pretrained(root / "base")
    model = add_lora(attach(AutoModelForCausalLM.from_pretrained(root / "base"), cfg), r=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    return save_adapter(model, root / "adapter", processor=processor)


def conversation(color=(200, 40, 10)):
    return [
        {"role": "system", "content": "You describe pictures."},
        {"role": "user", "content": [{"type": "image", "image": make_image(color)}, {"type": "text", "text": "What?"}]},
    ]


def chat_inputs(processor, messages, **kwargs):
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("export")
    adapter = make_adapter(root, tokenizer)
    return adapter, export(adapter, root / "llava")


@pytest.mark.parametrize("tower,feature_layer", [("clip", -1), ("clip", -2), ("siglip", -2)])
def test_llava_export_gives_the_logits_and_greedy_answer_of_the_vlm_peft_model(
    tmp_path, tokenizer, clip_export, tower, feature_layer
):
    if (tower, feature_layer) == ("clip", -1):
        adapter, out = clip_export
    else:
        adapter = make_adapter(tmp_path, tokenizer, tower, feature_layer, tied=tower == "siglip")  # both kinds
        out = export(adapter, tmp_path / "llava")
    ours, processor = load(adapter)  # PeftModel: LoRA not merged
    llava, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert llava.config.vision_feature_select_strategy == ("default" if tower == "clip" else "full")
    assert llava.config.tie_word_embeddings == ours.config.tie_word_embeddings
    llava_processor = AutoProcessor.from_pretrained(out)
    assert type(llava_processor).__name__ == "LlavaProcessor"

    ours_in, llava_in = chat_inputs(processor, conversation()), chat_inputs(llava_processor, conversation())
    assert ours_in["input_ids"].tolist() == llava_in["input_ids"].tolist()
    assert (ours_in["input_ids"] == llava.config.image_token_index).sum() == PATCHES
    torch.testing.assert_close(llava_in["pixel_values"], ours_in["pixel_values"], rtol=0, atol=0)
    with torch.no_grad():
        expected = ours(**ours_in).logits
        delta = (llava(**llava_in).logits - expected).abs().max().item()
        other = ours(**chat_inputs(processor, conversation((10, 40, 200)))).logits
    print(f"{tower} layer {feature_layer}: max |logit LLaVA - vlm-peft| = {delta:.2e}")
    assert delta <= 1e-5
    assert (other - expected).abs().max() > 1e-3  # the image matters: equal logits are not a text-only accident

    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        answer = ours.generate(**ours_in, **kwargs)[0, ours_in["input_ids"].shape[1] :]
        llava_answer = llava.generate(**llava_in, **kwargs)[0, llava_in["input_ids"].shape[1] :]
    assert answer.tolist() == llava_answer.tolist()


def test_checkpoint_layout(clip_export):
    adapter, out = clip_export
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    roots = {".".join(n.split(".")[:2]) if n.startswith("model.") else n for n in names}
    assert roots == {"model.language_model", "model.vision_tower", "model.multi_modal_projector", "lm_head.weight"}
    assert {n for n in names if "multi_modal_projector" in n} == {
        f"model.multi_modal_projector.linear_{i}.{kind}" for i in (1, 2) for kind in ("weight", "bias")
    }
    assert all(n.startswith("model.vision_tower.vision_model.") for n in names if "vision_tower" in n)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert (config["text_config"]["model_type"], config["vision_config"]["model_type"]) == (
        "qwen3",
        "clip_vision_model",
    )
    assert (config["projector_hidden_act"], config["vision_feature_layer"]) == ("gelu", -1)
    assert (config["vision_feature_select_strategy"], config["image_seq_length"]) == ("default", PATCHES)
    assert config["image_token_index"] == VLMConfig.from_pretrained(adapter).image_token_id
    assert config["image_token_index"] in json.loads((out / "generation_config.json").read_text())["suppress_tokens"]
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoProcessor.from_pretrained(out).chat_template
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt*")) and not (out / "vlm_config.json").exists()


def test_the_chat_template_renders_our_conversations(clip_export):
    adapter, out = clip_export
    _, ours = load(adapter)
    theirs = AutoProcessor.from_pretrained(out)
    red, blue = make_image((200, 40, 10)), make_image((10, 40, 200))
    image, second = {"type": "image", "image": red}, {"type": "image", "image": blue}
    cases = [
        ([{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}], {}),
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [image, second, {"type": "text", "text": "Same?"}]},
                {"role": "assistant", "content": "No."},
                {"role": "user", "content": "Why?"},
            ],
            {},
        ),
        ([{"role": "user", "content": [image, {"type": "text", "text": "Hi"}]}], {"enable_thinking": True}),
        ([{"role": "user", "content": [image, {"type": "text", "text": "Hi"}]}], {"enable_thinking": False}),
    ]
    for messages, kwargs in cases:
        assert chat_inputs(ours, messages, **kwargs)["input_ids"].tolist() == (
            chat_inputs(theirs, messages, **kwargs)["input_ids"].tolist()
        )
    trained = cases[1][0] + [{"role": "assistant", "content": "Colours."}]  # a whole conversation, as in training
    render = dict(tokenize=False, add_generation_prompt=False)
    assert ours.apply_chat_template(trained, **render).replace(ours.image_token * PATCHES, ours.image_token) == (
        theirs.apply_chat_template(trained, **render)
    )


def test_the_image_processor_preprocesses_as_ours(clip_export):
    """Equal pixel_values for RGB and for what both convert alike (transparency on white, palettes, grey); EXIF
    orientation and 16-bit grey differ (vlm-peft handles them, LLaVA's processor does not: the README says so)."""
    adapter, out = clip_export
    _, ours = load(adapter)
    theirs = AutoProcessor.from_pretrained(out)
    rgba = Image.new("RGBA", (40, 30), (200, 40, 10, 0))
    rgba.putpixel((3, 3), (0, 0, 255, 128))
    palette = Image.new("P", (40, 30))
    palette.putpalette([0, 0, 0, 255, 0, 0] * 128)
    palette.info["transparency"] = 0
    slot = ours.vision_start_token + ours.image_token + ours.vision_end_token
    for image in (
        make_image((1, 2, 3), (50, 20)),
        rgba,
        palette,
        Image.new("LA", (40, 30), (100, 50)),
        make_image((9, 9, 9), mode="L"),
    ):
        expected = ours(text=slot, images=[image])["pixel_values"]
        torch.testing.assert_close(theirs(text=slot, images=[image], return_tensors="pt")["pixel_values"], expected)


def test_the_chat_template_loops_over_message_content_as_vllm_detects_it(clip_export):
    """vLLM (and SGLang) hand a template image parts only when it has `for x in message.content` inside
    `for message in messages` (through filters); otherwise they flatten content to text with '<image>'."""
    template = AutoProcessor.from_pretrained(clip_export[1]).chat_template
    tree = _compile_jinja_template(template).environment.parse(template)  # as vLLM parses it

    def iterated(loop):  # what a loop runs over, through filters
        node = loop.iter
        while isinstance(node, jinja2.nodes.Filter):
            node = node.node
        return node

    loops = list(tree.find_all(jinja2.nodes.For))
    message_names = {loop.target.name for loop in loops if getattr(iterated(loop), "name", "") == "messages"}
    assert any(
        isinstance(node, jinja2.nodes.Getattr)
        and node.attr == "content"
        and getattr(node.node, "name", "") in message_names
        for node in map(iterated, loops)
    )


def test_export_from_a_merged_dir_equals_export_from_the_adapter(clip_export, tmp_path):
    adapter, out = clip_export
    again = export(merge(adapter, tmp_path / "merged"), tmp_path / "llava")
    with safe_open(out / "model.safetensors", "pt") as a, safe_open(again / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            torch.testing.assert_close(a.get_tensor(name), b.get_tensor(name), rtol=0, atol=1e-6)


def test_bf16_export(clip_export, tmp_path):
    adapter, _ = clip_export
    out = export(adapter, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    llava = LlavaForConditionalGeneration.from_pretrained(out)
    assert llava.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(llava(**chat_inputs(AutoProcessor.from_pretrained(out), conversation())).logits).all()


def test_cross_attention_is_refused_naming_the_merged_dir_which_then_exports(tmp_path, tokenizer, caplog):
    adapter = make_adapter(tmp_path, tokenizer, projector="cross_attention")
    with pytest.raises(ValueError, match="--format vlm-peft"):
        export(adapter, tmp_path / "llava")
    assert not (tmp_path / "llava").exists()
    with caplog.at_level(logging.ERROR):
        assert main(["export", str(adapter), str(tmp_path / "llava")]) == 2
    assert "'cross_attention' has no LLaVA equivalent" in caplog.text and "--format vlm-peft" in caplog.text
    assert main(["export", str(adapter), str(tmp_path / "merged"), "--format", "vlm-peft"]) == 0
    model, processor = load(tmp_path / "merged")
    with torch.no_grad():
        assert torch.isfinite(model(**chat_inputs(processor, conversation())).logits).all()


def test_siglip_at_the_last_layer_is_refused(tmp_path, tokenizer):
    """SigLIP's last_hidden_state has post_layernorm applied; LLaVA's hidden_states[-1] does not."""
    adapter = make_adapter(tmp_path, tokenizer, "siglip", -1)
    with pytest.raises(ValueError, match="post-LayerNorm.*--format vlm-peft"):
        export(adapter, tmp_path / "llava")
    assert not [p for p in tmp_path.iterdir() if "llava" in p.name]


def test_cli_export(clip_export, tmp_path):
    adapter, _ = clip_export
    assert main(["export", str(adapter), str(tmp_path / "out"), "--format", "llava", "--dtype", "float32"]) == 0
    assert LlavaForConditionalGeneration.from_pretrained(tmp_path / "out") is not None
    assert main(["export", str(adapter), str(tmp_path / "out")]) == 2  # exists: --overwrite needed
    assert main(["export", str(adapter), str(tmp_path / "out"), "--overwrite"]) == 0
