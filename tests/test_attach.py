import pytest
import torch

from vlm_peft import add_lora, attach, detach
from vlm_peft.model.hooks import PROJECTOR_ATTR

from .conftest import N, make_image, user_turn

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def batch_for(processor, convs, images, **kw):
    texts = [processor.apply_chat_template(c) for c in convs]
    return processor(text=texts, images=images, **kw)


def sample(processor, text="What is this?", color=RED):
    conv = user_turn(text) + [{"role": "assistant", "content": "A red circle."}]
    return batch_for(processor, [conv], [make_image(color)])


def test_loss_gradients_reach_only_projector(llm, processor, vlm_cfg):
    model = attach(llm, vlm_cfg)
    batch = sample(processor)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert with_grad and all(n.startswith(f"{PROJECTOR_ATTR}.") for n in with_grad)


def test_image_changes_logits_only_from_the_image_on(llm, processor, vlm_cfg):
    model = attach(llm, vlm_cfg)
    red, blue = sample(processor, color=RED), sample(processor, color=BLUE)
    with torch.no_grad():
        a, b = model(**red).logits, model(**blue).logits
    start = red["input_ids"][0].tolist().index(processor.image_token_id)
    torch.testing.assert_close(a[:, :start], b[:, :start], rtol=0, atol=0)
    assert (a[:, start + N :] - b[:, start + N :]).abs().max() > 1e-4


def test_text_only_is_the_plain_model(llm, processor, vlm_cfg, tokenizer):
    ids = tokenizer(["What is this? A red circle."], return_tensors="pt")
    with torch.no_grad():
        plain = llm(**ids).logits.clone()
        model = attach(llm, vlm_cfg)
        torch.testing.assert_close(model(**ids).logits, plain, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["cross_attention", "mlp"])
def test_a_text_only_training_batch_runs_the_projector_idle(llm, vlm_cfg, tokenizer, kind):
    # Every rank runs the same modules whatever its batch holds; the output is the plain model's.
    import dataclasses

    cfg = dataclasses.replace(vlm_cfg, projector=kind, num_image_tokens=16) if kind == "mlp" else vlm_cfg
    ids = tokenizer(["What is this? A red circle."], return_tensors="pt")
    with torch.no_grad():
        plain = llm(**ids).logits.clone()
    model = attach(llm, cfg).train()
    calls = []
    projector = getattr(model, PROJECTOR_ATTR)
    handle = projector.register_forward_hook(lambda *a: calls.append(1))
    out = model(**ids, labels=ids["input_ids"])
    handle.remove()
    assert calls == [1]
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=0)
    out.loss.backward()  # a frozen LLM's loss still has a graph
    grads = [p.grad for p in projector.parameters()]
    assert all(g is not None and not g.any() for g in grads)
    with torch.no_grad():
        model(**ids)
    assert calls == [1]  # not in evaluation or generation


def test_vision_tower_outside_state_dict_and_frozen(llm, vlm_cfg):
    keys_before = set(llm.state_dict())
    model = attach(llm, vlm_cfg)
    new_keys = set(model.state_dict()) - keys_before
    assert new_keys and all(k.startswith(f"{PROJECTOR_ATTR}.") for k in new_keys)
    model.train()
    state = model._vlm_state
    assert not state.vision.training
    assert not any(p.requires_grad for p in state.vision.parameters())


def test_detach_restores_the_model_bit_for_bit(llm, processor, vlm_cfg, tokenizer):
    ids = tokenizer(["The picture shows a yellow star."], return_tensors="pt")
    flags = {n: p.requires_grad for n, p in llm.named_parameters()}
    with torch.no_grad():
        plain = llm(**ids).logits.clone()
    keys = set(llm.state_dict())
    model = add_lora(attach(llm, vlm_cfg), r=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # non-zero LoRA: detach must remove it, not merge it
        model(**sample(processor))
    restored = detach(model)
    assert restored is llm
    assert set(restored.state_dict()) == keys
    assert {n: p.requires_grad for n, p in restored.named_parameters()} == flags
    assert not restored._forward_pre_hooks and "generate" not in restored.__dict__
    with torch.no_grad():
        torch.testing.assert_close(restored(**ids).logits, plain, rtol=0, atol=0)
    # Attachable again after a detach.
    assert attach(restored, vlm_cfg)(**sample(processor)).logits.shape[0] == 1


def test_peft_wrapped_equals_bare_and_trains_the_projector_copy(llm, processor, vlm_cfg):
    model = attach(llm, vlm_cfg)
    batch = sample(processor)
    with torch.no_grad():
        bare = model(**batch).logits.clone()
    peft_model = add_lora(model, r=4)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, bare, rtol=0, atol=0)
    out = peft_model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert any("modules_to_save" in n and PROJECTOR_ATTR in n for n in grads)
    assert any("lora_" in n for n in grads)
    assert not any("original_module" in n for n in grads)
    # LoRA stays out of the projector.
    assert not any(PROJECTOR_ATTR in n and "lora_" in n for n, _ in peft_model.named_parameters())
    # The hook calls the trainable copy: changing it changes the output.
    wrapper = getattr(llm, PROJECTOR_ATTR)
    with torch.no_grad():
        wrapper.modules_to_save["default"].slot_embed.add_(1.0)
        assert (peft_model(**batch).logits - bare).abs().max() > 1e-3


@pytest.mark.parametrize("targets", [None, "all-linear", ["to_q", "q_proj", "fc1"]])
def test_lora_lands_in_the_decoder_only(llm, vlm_cfg, targets):
    model = add_lora(attach(llm, vlm_cfg), r=2, target_modules=targets)
    lora = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    assert lora and all(".model.layers." in n for n in lora)
    if targets is None:
        assert len(lora) == 7 * llm.config.num_hidden_layers
    assert not any("lora" in n for n, _ in model._vlm_state.vision.named_modules())


def test_lora_without_projector_in_modules_to_save_is_refused(llm, vlm_cfg):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="modules_to_save"):
        add_lora(attach(llm, vlm_cfg), LoraConfig(r=2, target_modules=["q_proj"]))


def test_batch_equals_single_samples_left_and_right_padding(llm, processor, vlm_cfg):
    model = attach(llm, vlm_cfg).eval()
    convs = [
        user_turn("What is this?") + [{"role": "assistant", "content": "A red circle."}],
        user_turn("Describe the image.", images=2) + [{"role": "assistant", "content": "A blue square and a star."}],
        [{"role": "user", "content": "What is this?"}],
    ]
    images = [[make_image(RED)], [make_image(BLUE), make_image(GREEN, size=(20, 50))], []]
    singles = []
    with torch.no_grad():
        for conv, imgs in zip(convs, images):
            singles.append(model(**batch_for(processor, [conv], imgs or None)).logits[0])
        for side in ("left", "right"):
            processor.tokenizer.padding_side = side
            batch = batch_for(processor, convs, images)
            logits = model(**batch).logits
            for row, single in enumerate(singles):
                keep = batch["attention_mask"][row].bool()
                torch.testing.assert_close(logits[row][keep], single, rtol=1e-4, atol=1e-4)


def test_placeholder_errors(llm, processor, vlm_cfg):
    model = attach(llm, vlm_cfg)
    batch = sample(processor)
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    with pytest.raises(ValueError, match="1 image placeholder runs .* but 2 images"):
        model(input_ids=ids, pixel_values=torch.cat([pixels, pixels]))
    with pytest.raises(ValueError, match="1 image placeholder runs .* but 0 images"):
        model(input_ids=ids)
    text_ids = ids[:, :3]
    with pytest.raises(ValueError, match="0 image placeholder runs .* but 1 images"):
        model(input_ids=text_ids, pixel_values=pixels)
    first = ids[0].tolist().index(processor.image_token_id)
    cut = ids[:, : first + N // 2]
    with pytest.raises(ValueError, match=f"sample 0: image placeholder run 1 has {N // 2} .*expected exactly {N}"):
        model(input_ids=cut, pixel_values=pixels)
    two = torch.cat([ids, ids[:, first - 1 :]], dim=1)  # second sample-run is fine, count is not
    with pytest.raises(ValueError, match="2 image placeholder runs"):
        model(input_ids=two, pixel_values=pixels)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=llm.get_input_embeddings()(ids), pixel_values=pixels)
    with pytest.raises(ValueError, match="already has vision"):
        attach(llm, vlm_cfg)


def test_precomputed_features_equal_pixels(llm, processor, vlm_cfg):
    model = attach(llm, vlm_cfg)
    batch = sample(processor)
    features = model._vlm_state.vision(batch["pixel_values"])
    with torch.no_grad():
        a = model(**batch).logits
        b = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_features=features).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="image_features must be"):
        model(input_ids=batch["input_ids"], image_features=features[:, :3])


def test_positional_input_ids(llm, processor, vlm_cfg):
    model = attach(llm, vlm_cfg)
    batch = sample(processor)
    with torch.no_grad():
        a = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
        b = model(**batch).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mlp_projector_end_to_end(llm, processor, vlm_cfg):
    import dataclasses

    from vlm_peft import VLMProcessor

    cfg = dataclasses.replace(vlm_cfg, projector="mlp", num_image_tokens=16)
    proc = VLMProcessor(processor.image_processor, processor.tokenizer, num_image_tokens=16)
    model = attach(llm, cfg)
    batch = sample(proc)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert getattr(model, PROJECTOR_ATTR).fc_in.weight.grad is not None


def test_unknown_image_token_id_is_refused(llm, vlm_cfg):
    import dataclasses

    with pytest.raises(ValueError, match="resize_token_embeddings"):
        attach(llm, dataclasses.replace(vlm_cfg, image_token_id=10**6))


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_siglip_tower_and_feature_layer(llm, processor, vlm_cfg, feature_layer):
    import dataclasses

    from vlm_peft.tiny import tiny_siglip_config

    cfg = dataclasses.replace(vlm_cfg, vision_config=tiny_siglip_config(), vision_feature_layer=feature_layer)
    model = attach(llm, cfg)
    batch = sample(processor)
    features = model._vlm_state.vision(batch["pixel_values"])
    assert features.shape == (1, 16, 32)  # SigLIP has no CLS token to drop
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert model._vlm_state.config.num_patches == 16


def test_gradient_checkpointing_gives_the_same_gradients(llm, processor, vlm_cfg):
    model = attach(llm, vlm_cfg).train()
    batch = sample(processor)

    def grads():
        model.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_bf16_llm_keeps_fp32_projector(llm, processor, vlm_cfg):
    model = attach(llm.to(torch.bfloat16), vlm_cfg)
    assert all(p.dtype == torch.float32 for p in model.vlm_projector.parameters())
    batch = sample(processor)
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert model.vlm_projector.slot_embed.grad.dtype == torch.float32
    assert model.vlm_projector.slot_embed.grad.abs().sum() > 0


def test_detach_removes_the_input_grad_hook_peft_added(llm, vlm_cfg):
    model = add_lora(attach(llm, vlm_cfg), r=2)
    model.enable_input_require_grads()  # what TRL does with gradient checkpointing + PEFT
    assert model.get_input_embeddings()._forward_hooks
    restored = detach(model)
    assert not restored.get_input_embeddings()._forward_hooks


def test_the_idle_projector_cannot_overflow_into_nan(llm, vlm_cfg, tokenizer):
    # Each output fits fp16 but their sum does not: zeroing before summing keeps the embeddings finite.
    import dataclasses

    cfg = dataclasses.replace(vlm_cfg, projector="linear", num_image_tokens=16)
    model = attach(llm.half(), cfg).train()
    with torch.no_grad():
        getattr(model, PROJECTOR_ATTR).proj.bias.fill_(1000.0)
    from vlm_peft.model.hooks import embed_with_idle_projector

    ids = tokenizer(["What is this?"], return_tensors="pt")["input_ids"]
    assert torch.isfinite(embed_with_idle_projector(model, ids)).all()
