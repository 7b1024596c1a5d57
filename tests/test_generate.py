import pytest
import torch

from vlm_peft import add_lora, attach

from .conftest import make_image, user_turn

COLORS = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (250, 250, 0)]


@pytest.fixture()
def model(llm, vlm_cfg):
    torch.manual_seed(3)
    model = attach(llm, vlm_cfg).eval()
    with torch.no_grad():  # loud image tokens, so that swapped images would change the text
        for p in model.vlm_projector.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def prompt(processor, text="What is this?", images=1):
    return processor.apply_chat_template(user_turn(text, images), add_generation_prompt=True)


def greedy_loop(model, input_ids, pixel_values, steps):
    """Reference: full forward without cache at each step, argmax."""
    ids = input_ids
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixel_values, use_cache=False).logits[:, -1]
        logits[:, model._vlm_state.config.image_token_id] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_cached_equals_uncached_equals_greedy_loop(model, processor):
    batch = processor(text=prompt(processor), images=[make_image(COLORS[0])])
    kwargs = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    cached = model.generate(**batch, use_cache=True, **kwargs)
    uncached = model.generate(**batch, use_cache=False, **kwargs)
    reference = greedy_loop(model, batch["input_ids"], batch["pixel_values"], 8)
    assert cached.tolist() == uncached.tolist() == reference.tolist()


def test_image_encoded_once_and_only_prefill_carries_images(model, processor):
    batch = processor(text=prompt(processor), images=[make_image(COLORS[0])])
    tower_calls, with_images = [], []
    model._vlm_state.vision.register_forward_hook(lambda *a: tower_calls.append(1))
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: with_images.append(args[0].shape[1]))
    model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert len(tower_calls) == 1
    assert with_images[0] == batch["input_ids"].shape[1] and set(with_images[1:]) == {1}


def test_generated_tokens_depend_on_the_image(model, processor):
    # Guards the comparisons of generation logits below against passing because images do not matter.
    logits = []
    for color in COLORS:
        batch = processor(text=prompt(processor), images=[make_image(color)])
        out = model.generate(
            **batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        logits.append(out.logits[0])
    for a, b in zip(logits, logits[1:]):
        assert (a - b).abs().max() > 1e-3


def test_batched_left_padded_equals_single(model, processor):
    processor.tokenizer.padding_side = "left"
    texts = [prompt(processor), prompt(processor, "Describe the image.", images=2), prompt(processor, "Hi", 0)]
    images = [[make_image(COLORS[0])], [make_image(COLORS[1]), make_image(COLORS[2])], []]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    together = model.generate(**processor(text=texts, images=images), **kwargs)
    for row, (text, imgs) in enumerate(zip(texts, images)):
        single = model.generate(**processor(text=text, images=imgs or None), **kwargs)
        assert together.sequences[row, -6:].tolist() == single.sequences[0, -6:].tolist()
        for step_together, step_single in zip(together.logits, single.logits):
            torch.testing.assert_close(step_together[row], step_single[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["num_return_sequences", "beams"])
def test_multi_image_samples_keep_their_images_when_rows_repeat(model, processor, mode):
    processor.tokenizer.padding_side = "left"
    texts = [prompt(processor, "Compare", images=2), prompt(processor, "Describe the image.", images=1)]
    images = [[make_image(COLORS[0]), make_image(COLORS[1])], [make_image(COLORS[2])]]
    extra = (
        dict(num_return_sequences=2, do_sample=False, num_beams=2)
        if mode == "num_return_sequences"
        else dict(num_beams=3, do_sample=False)
    )
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, output_scores=True, return_dict_in_generate=True, **extra)
    together = model.generate(**processor(text=texts, images=images), **kwargs)
    k = together.sequences.shape[0] // 2
    for row, (text, imgs) in enumerate(zip(texts, images)):
        single = model.generate(**processor(text=text, images=imgs), **kwargs)
        assert together.sequences[row * k : (row + 1) * k, -5:].tolist() == single.sequences[:, -5:].tolist()
        # Beam scores are continuous in the image features: swapped images would move them.
        torch.testing.assert_close(
            together.sequences_scores[row * k : (row + 1) * k], single.sequences_scores, rtol=1e-4, atol=1e-4
        )


def test_generate_with_lora(model, processor):
    peft_model = add_lora(model, r=4).eval()  # new LoRA modules start in train mode (dropout)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    batch = processor(text=prompt(processor), images=[make_image(COLORS[0])])
    out = peft_model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    reference = greedy_loop(peft_model, batch["input_ids"], batch["pixel_values"], 6)
    assert out.tolist() == reference.tolist()
    other = processor(text=prompt(processor), images=[make_image(COLORS[1])])
    kwargs = dict(max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    a, b = peft_model.generate(**batch, **kwargs), peft_model.generate(**other, **kwargs)
    assert (a.logits[0] - b.logits[0]).abs().max() > 1e-3  # the PEFT path sees the image


def test_never_generates_placeholders_and_errors_clearly(model, processor):
    batch = processor(text=prompt(processor), images=[make_image(COLORS[0])])
    image_id = processor.image_token_id
    with torch.no_grad():
        model.lm_head.weight[image_id] += 10.0  # make the placeholder the model's favourite token
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert image_id not in out[0, batch["input_ids"].shape[1] :].tolist()
    with pytest.raises(ValueError, match="1 image placeholder runs .* but 2 images"):
        model.generate(**batch | {"pixel_values": batch["pixel_values"].repeat(2, 1, 1, 1)}, max_new_tokens=2)


def test_user_suppress_tokens_are_kept_and_text_only_generate_works(model, processor):
    text = processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    batch = processor(text=text)
    free = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    first = free[0, batch["input_ids"].shape[1]].item()
    model.generation_config.suppress_tokens = [first]
    out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out[0, batch["input_ids"].shape[1]].item() != first
    empty = torch.zeros(0, 3, 32, 32)
    again = model.generate(**batch, pixel_values=empty, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert again.tolist() == out.tolist()


def test_continuing_a_cached_chat_with_a_new_image_equals_a_full_prefill(model, processor):
    from transformers import DynamicCache

    first = processor(text=prompt(processor), images=[make_image(COLORS[0])])
    cache = DynamicCache(config=model.config)
    out = model.generate(**first, max_new_tokens=3, min_new_tokens=3, do_sample=False, cache=cache)
    second = processor(text=prompt(processor, "And this?"), images=[make_image(COLORS[1])])
    ids = torch.cat([out, second["input_ids"]], dim=1)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    continued = model.generate(input_ids=ids, pixel_values=second["pixel_values"], cache=cache, **kwargs)
    both = torch.cat([first["pixel_values"], second["pixel_values"]])
    full = model.generate(input_ids=ids, pixel_values=both, **kwargs)
    assert continued.tolist() == full.tolist()


def test_positional_inputs_and_unsupported_options(model, processor):
    batch = processor(text=prompt(processor), images=[make_image(COLORS[0])])
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    named = model.generate(**batch, **kwargs)
    positional = model.generate(
        batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"], **kwargs
    )
    as_inputs = model.generate(
        inputs=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"], **kwargs
    )
    assert named.tolist() == positional.tolist() == as_inputs.tolist()
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        model.generate(**batch, prefill_chunk_size=4, **kwargs)
    with pytest.raises(ValueError, match="assisted generation"):
        model.generate(**batch, assistant_model=model, **kwargs)
