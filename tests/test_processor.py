import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_peft import VLMProcessor
from vlm_peft.tiny import tiny_image_processor, tiny_tokenizer

from .conftest import CORPUS, N, make_image, user_turn

RUN = "<|vision_start|>" + "<|image_pad|>" * N + "<|vision_end|>"
ANSWER = [{"role": "assistant", "content": "A red circle."}]


def test_training_text_is_qwen3_format(processor):
    text = processor.apply_chat_template(user_turn("What is this?") + ANSWER)
    assert text == (
        f"<|im_start|>user\n{RUN}What is this?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nA red circle.<|im_end|>\n"
    )


def test_generation_prompt_is_non_thinking(processor):
    text = processor.apply_chat_template(user_turn("What is this?"), add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = processor.apply_chat_template(
        user_turn("What is this?"), add_generation_prompt=True, enable_thinking=True
    )
    assert thinking.endswith("<|im_start|>assistant\n")


def test_multi_turn_think_block_only_on_last_assistant(processor):
    conv = (
        [{"role": "system", "content": "Be brief."}]
        + user_turn("What is this?")
        + ANSWER
        + [{"role": "user", "content": "And the colour?"}, {"role": "assistant", "content": "Red."}]
    )
    text = processor.apply_chat_template(conv)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "<|im_start|>assistant\nA red circle.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nRed.<|im_end|>\n")
    assert text.count(RUN) == 1


def test_images_in_order_and_text_between(processor):
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image"},
                {"type": "text", "text": " and "},
                {"type": "image"},
            ],
        }
    ]
    text = processor.apply_chat_template(conv)
    assert f"Compare {RUN} and {RUN}<|im_end|>" in text


def test_call_expands_collapsed_slot_and_returns_pixels(processor):
    collapsed = "<|vision_start|><|image_pad|><|vision_end|>Hi"
    batch = processor(text=collapsed, images=make_image((255, 0, 0)))
    ids = batch["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == N
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    full = processor(text=RUN + "Hi", images=[make_image((255, 0, 0))])
    assert full["input_ids"].tolist() == batch["input_ids"].tolist()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "LA", "I", "1"])
@pytest.mark.parametrize("size", [(1, 1), (7, 300), (640, 480)])
def test_any_image_mode_and_size(processor, mode, size):
    image = make_image((10, 200, 30), size=size, mode=mode)
    out = processor(text=RUN, images=[image])
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert torch.isfinite(out["pixel_values"]).all()


def test_transparent_pixels_become_white(processor):
    transparent = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    a = processor(text=RUN, images=[transparent])["pixel_values"]
    b = processor(text=RUN, images=[white])["pixel_values"]
    torch.testing.assert_close(a, b)


def test_image_count_errors(processor):
    image = make_image((0, 0, 0))
    with pytest.raises(ValueError, match="2 image placeholders .* 1 images"):
        processor(text=RUN + RUN, images=[image])
    with pytest.raises(ValueError, match="sample 1: text holds 0 image placeholders but 1 images given"):
        processor(text=[RUN, "no image"], images=[[image], [image]])
    with pytest.raises(ValueError, match="zero size"):
        processor(text=RUN, images=[Image.new("RGB", (0, 4))])
    with pytest.raises(ValueError, match="sample 0: image placeholder run 1 has 3"):
        processor(text="<|vision_start|>" + "<|image_pad|>" * 3 + "<|vision_end|>", images=[image])


def test_truncation_that_cuts_an_image_is_an_error(processor):
    with pytest.raises(ValueError, match=r"sample 1: image placeholder run 1 has \d+ .*truncation"):
        processor(
            text=[RUN, "Hello " + RUN],
            images=[[make_image((1, 2, 3))], [make_image((1, 2, 3))]],
            truncation=True,
            max_length=N + 2,
        )


def test_batch_padding_sides(processor):
    texts = [RUN + "What is this?", "Hi " + RUN]
    images = [make_image((255, 0, 0)), make_image((0, 255, 0))]
    processor.tokenizer.padding_side = "left"
    left = processor(text=texts, images=images)
    assert left["attention_mask"].shape == left["input_ids"].shape
    assert left["attention_mask"][:, -1].all()


def test_adds_missing_tokens_and_roundtrips(tmp_path):
    bare = tiny_tokenizer(CORPUS, vocab_size=300, special_tokens=["<|endoftext|>"])
    assert "<|image_pad|>" not in bare.get_vocab()
    before = len(bare)
    proc = VLMProcessor(tiny_image_processor(32), bare, num_image_tokens=5)
    assert len(proc.tokenizer) == before + 5
    assert proc.tokenizer.convert_tokens_to_ids("<|image_pad|>") == proc.image_token_id
    proc.save_pretrained(tmp_path)
    loaded = VLMProcessor.from_pretrained(tmp_path)
    assert loaded.num_image_tokens == 5
    assert loaded.image_token_id == proc.image_token_id
    conv = user_turn("What is this?") + ANSWER
    assert loaded.apply_chat_template(conv) == proc.apply_chat_template(conv)
    image = make_image((3, 4, 5))
    a, b = (
        proc(text=proc.apply_chat_template(conv), images=[image]),
        loaded(text=loaded.apply_chat_template(conv), images=[image]),
    )
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])


def test_tokenize_loads_images_from_content_parts(processor, tmp_path):
    path = tmp_path / "red.png"
    make_image((255, 0, 0)).save(path)
    conv = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "What?"}]}]
    out = processor.apply_chat_template(conv, tokenize=True, return_dict=True, add_generation_prompt=True)
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert out["input_ids"][0].tolist().count(processor.image_token_id) == N


TOOLS = [{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object", "properties": {}}}}]
TEXT_CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6.", "reasoning_content": "add again"},
    ],
    [
        {"role": "user", "content": "Zoom in."},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "zoom", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "done"},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "Zoomed."},
    ],
    # The last turn: only a newline, then tool calls (Qwen3 tests the content before stripping it).
    [
        {"role": "user", "content": "Zoom twice."},
        {
            "role": "assistant",
            "content": "\n",
            "tool_calls": [
                {"function": {"name": "zoom", "arguments": {"x": 1}}},
                {"function": {"name": "zoom", "arguments": '{"x": 2}'}},
            ],
        },
    ],
]


@pytest.mark.parametrize("conv", TEXT_CONVERSATIONS)
@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("gen", [False, True])
def test_text_only_conversations_render_like_qwen3(processor, conv, tools, gen):
    from importlib.resources import files

    qwen3 = (files("trl") / "chat_templates" / "qwen3.jinja").read_text()  # Qwen3's own template, shipped by TRL
    if gen:
        conv = conv[:-1]
    kwargs = dict(tools=tools, add_generation_prompt=gen, enable_thinking=False)
    expected = processor.tokenizer.apply_chat_template(conv, chat_template=qwen3, tokenize=False, **kwargs)
    assert processor.apply_chat_template(conv, **kwargs) == expected


def test_assistant_mask_covers_answer_and_end_of_turn(processor):
    image = {"type": "image", "image": make_image((255, 0, 0))}
    conv = [
        {"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red circle."},
    ]
    out = processor.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    ids, mask = out["input_ids"][0].tolist(), list(out["assistant_masks"][0])
    answer = processor.tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert answer == "A red circle.<|im_end|>"


def test_tokenizer_and_image_kwargs_are_routed(processor):
    text = processor.apply_chat_template(user_turn("What is this?"))
    image = make_image((1, 2, 3), size=(64, 64))
    with pytest.raises(ValueError, match="truncation"):
        processor(text=text, images=[image], truncation=True, max_length=5)
    out = processor(text=text, images=[image], do_center_crop=False, size={"height": 16, "width": 16}, do_resize=True)
    assert out["pixel_values"].shape == (1, 3, 16, 16)
    prefill = processor.apply_chat_template(
        user_turn("What is this?") + [{"role": "assistant", "content": "A red"}], continue_final_message=True
    )
    assert prefill.endswith("A red")


def test_generation_prompt_tokens_are_a_prefix_of_the_training_tokens(processor):
    # Otherwise the model is trained on answers tokenized unlike what it sees at generation.
    conv = user_turn("What is this?") + [{"role": "assistant", "content": "A red circle."}]
    image = [make_image((1, 2, 3))]
    full = processor(text=processor.apply_chat_template(conv), images=image)["input_ids"][0].tolist()
    prompt = processor(text=processor.apply_chat_template(conv[:1], add_generation_prompt=True), images=image)
    prompt = prompt["input_ids"][0]
    assert full[: len(prompt)] == prompt.tolist()


def test_saved_processor_forgets_the_last_calls_truncation(processor, tmp_path):
    # A fast tokenizer keeps the last call's truncation in tokenizer.json; reloaded, it would default to it.
    processor(text=processor.apply_chat_template(user_turn("What is this?")), images=[make_image((1, 2, 3))],
              truncation=True, max_length=64)  # fmt: skip
    processor.save_pretrained(tmp_path)
    again = VLMProcessor.from_pretrained(tmp_path)
    assert "max_length" not in again.tokenizer.init_kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again(text=[processor.apply_chat_template(user_turn("Hi", images=0))] * 2, padding=True)


GREYS = [0, 1, 77, 128, 254, 255]  # 8-bit grey levels that every mode below can hold


def _grey_image(mode: str) -> Image.Image:
    """A 6x1 image of GREYS, as it looks stored in `mode` (its native range)."""
    if mode.startswith("I;16"):
        image = Image.new(mode, (6, 1))
        image.putdata([g * 257 for g in GREYS])  # 16-bit PNG values: 255 -> 65535
        return image
    if mode == "F":
        image = Image.new("F", (6, 1))
        image.putdata([g / 255 for g in GREYS])  # floats in [0, 1]
        return image
    base = Image.new("L", (6, 1))
    base.putdata(GREYS)
    return base.convert(mode)


@pytest.mark.parametrize(
    "mode",
    ["L", "RGB", "RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B", "I;16L", "F", "1"],
)
def test_every_pil_mode_converts_to_the_reference_grey(mode):
    from vlm_peft.data.processor import to_rgb

    if mode in ("PA",):
        image = _grey_image("RGBA").convert("PA")
    else:
        image = _grey_image(mode)
    rgb = np.asarray(to_rgb(image), dtype=np.int16)
    expected = np.array([0 if g < 128 else 255 for g in GREYS] if mode == "1" else GREYS, dtype=np.int16)
    tolerance = {"CMYK": 1, "YCbCr": 2, "LAB": 2, "HSV": 1, "P": 2, "PA": 2}.get(mode, 0)
    for channel in range(3):
        assert np.abs(rgb[0, :, channel] - expected).max() <= tolerance, (mode, rgb[0, :, channel])


def test_a_16_bit_png_is_not_white(tmp_path):
    from vlm_peft.data.processor import to_rgb

    values = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = Image.open(tmp_path / "deep.png")
    assert image.mode.startswith("I")
    grey = np.asarray(to_rgb(image))[..., 0]
    np.testing.assert_array_equal(grey, np.round(values / 257).astype(np.uint8))
    assert (grey == 255).mean() < 0.05
