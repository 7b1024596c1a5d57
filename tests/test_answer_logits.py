"""Logits only at supervised positions give the full computation's loss, gradients and metrics."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import add_fused_lm_head

from vlm_peft import add_lora, attach
from vlm_peft.data.collator import IGNORE_INDEX, VLMCollator
from vlm_peft.training import answer_logits as head_module
from vlm_peft.training.answer_logits import answer_logits, answer_positions_only

from .conftest import make_image

QUESTIONS = ["What is this?", "Describe the image.", "What is this? Describe the image."]
ANSWERS = ["A red circle.", "The picture shows a yellow star on a white background.", "A blue square."]


def row(root, i: int, images: int, turns: int = 1) -> dict:
    refs = []
    for k in range(images):
        make_image((40 * i + 20 * k, 200 - 30 * k, 90)).save(root / f"{i}-{k}.png")
        refs.append(f"{i}-{k}.png")
    messages = []
    for t in range(turns):
        content = [{"type": "image"}] * (images if t == 0 else 0) + [{"type": "text", "text": QUESTIONS[(i + t) % 3]}]
        messages += [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[(i + t) % 3]}]},
        ]
    return {"messages": messages, "images": refs}


def left_padded(batch: dict) -> dict:
    """The same rows with their padding moved to the left."""
    out = {k: v.clone() for k, v in batch.items()}
    for b, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        for key in ("input_ids", "attention_mask", "labels"):
            out[key][b] = batch[key][b].roll(batch[key].shape[1] - n)
    return out


@pytest.fixture()
def model(llm, vlm_cfg):
    model = add_lora(attach(llm, vlm_cfg), r=4, lora_dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    # What SFTTrainer does to the model it trains.
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    return model


@pytest.fixture()
def batches(processor, tmp_path):
    collate = VLMCollator(processor, tmp_path)
    layouts = [[(1, 1), (0, 2), (2, 1)], [(1, 2), (1, 1)], [(2, 1), (1, 3), (0, 1), (1, 1)]]
    right = [collate([row(tmp_path, i, images, turns) for i, (images, turns) in enumerate(rows)]) for rows in layouts]
    return {"right": right, "left": [left_padded(b) for b in right]}


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out


@pytest.fixture(params=["AnswerHead", "TRL tiles"])
def head(request, monkeypatch):
    """Which head projects the supervised positions: ours (in tiles of 3 positions, so that several
    tiles and a partial one are crossed), or TRL's own (where ours does not cover the call)."""
    calls = []
    if request.param == "AnswerHead":
        monkeypatch.setattr(head_module, "TOKENS_PER_TILE", 3)
        forward = head_module.AnswerHead.forward
        monkeypatch.setattr(head_module.AnswerHead, "forward", lambda *a: calls.append(1) or forward(*a))
    else:
        monkeypatch.setattr(head_module._Head, "covers", lambda *a: False)
    yield request.param
    assert bool(calls) == (request.param == "AnswerHead")


@pytest.mark.parametrize("padding", ["right", "left"])
def test_answer_only_loss_and_gradients_equal_the_full_ones(model, batches, padding, head):
    for batch in batches[padding]:
        full = model(**batch, use_cache=False)
        full.loss.backward()
        expected = grads(model)
        with answer_positions_only():
            fused = model(**batch, use_cache=False, fused_lm_head=True)
        fused.loss.backward()
        got = grads(model)
        assert abs(fused.loss.item() - full.loss.item()) <= 1e-5
        assert expected.keys() == got.keys() and any("lora" in n for n in got) and any("projector" in n for n in got)
        for name in expected:
            assert torch.allclose(got[name], expected[name], atol=1e-5, rtol=1e-4), name
        # TRL's logged metrics (entropy, mean_token_accuracy) from the same positions as the full logits.
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        logits = full.logits[:, :-1][mask].detach()
        assert torch.equal(fused.label_mask, mask)
        entropy = -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum(-1)
        assert torch.allclose(fused.entropy[mask].detach(), entropy, atol=1e-5)
        assert torch.equal(fused.is_top1[mask].bool(), logits.argmax(-1) == labels[mask])


def test_the_lm_head_projects_only_the_supervised_positions(model, batches, head):
    batch = batches["right"][2]
    config = model.get_base_model().config
    per_position = 2 * config.hidden_size * config.vocab_size  # the LM head's FLOPs

    def flops(compact: bool) -> int:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter, answer_positions_only() if compact else torch.enable_grad():
            model(**batch, use_cache=False, fused_lm_head=True)
        return counter.get_total_flops()

    rows, seq = batch["input_ids"].shape
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert supervised < rows * (seq - 1) / 2
    assert flops(False) - flops(True) == per_position * (rows * (seq - 1) - supervised)


def test_evaluation_logits_are_the_full_logits_at_the_answer_positions(model, batches):
    for batch in batches["right"] + batches["left"]:
        with torch.no_grad():
            full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            logits, labels = answer_logits(model, batch)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        assert torch.equal(labels, batch["labels"][:, 1:][mask])
        assert torch.allclose(logits, full[:, :-1][mask], atol=1e-5)


def head_inputs(n: int, vocab: int = 200, hidden: int = 16) -> tuple[torch.Tensor, ...]:
    """Random head inputs with a confident position (p(target) > 0.999, where bf16 would round 1 - p to 0)
    and one whose target ties with an earlier token for the maximum (not the top-1 then)."""
    g = torch.Generator().manual_seed(n)
    weight, bias = torch.randn(vocab, hidden, generator=g), torch.randn(vocab, generator=g)
    states, targets = torch.randn(n, hidden, generator=g), torch.randint(1, vocab, (n,), generator=g)
    if n >= 2:
        states[0] = weight[targets[0]] * 10
        weight[0], bias[0] = weight[targets[1]], bias[targets[1]]
        states[1] = weight[targets[1]] * 10
    return states, weight, bias, targets


@pytest.mark.parametrize("n", [0, 7])
@pytest.mark.parametrize("bf16", [False, True])
def test_answer_head_equals_trls_head(n, bf16, monkeypatch):
    """AnswerHead against TRL's own kernel on the same call (temperature, logit scale, bias, several token
    and vocabulary tiles, a per-position incoming gradient, ties, an empty call, bf16 autocast), and its
    gradient against autograd through the same logits in fp32."""
    monkeypatch.setattr(head_module, "TOKENS_PER_TILE", 3)
    monkeypatch.setattr(head_module, "VOCAB_CHUNK", 64)
    states, weight, bias, targets = head_inputs(n)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(1))
    outputs, scale = ("log_probs", "entropy", "is_top1"), 1.3 / 0.7
    results = []
    for fn in (head_module.AnswerHead.apply, None):
        hidden = states.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if fn is None:
                got = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 0.7, 64, None, 1.3, outputs)
            else:
                got = fn(hidden, weight, bias, targets, scale, outputs)
        (got[0] * upstream).sum().backward()
        results.append((got[0], got[1], got[4], hidden.grad))
    (ours, entropy, top1, grad), (theirs, entropy_trl, top1_trl, grad_trl) = results
    assert ours.shape == (n,) and grad.shape == (n, 16)
    assert torch.allclose(ours, theirs, atol=1e-4) and torch.allclose(entropy, entropy_trl, atol=1e-4)
    assert torch.equal(top1, top1_trl)
    if n:
        assert top1[0] and not top1[1] and ours[0].exp() > 0.999
    # The exact gradient of the logits the head computed (bf16 under autocast): autograd in fp32 through them.
    hidden = states.clone().requires_grad_()
    exact = hidden @ weight.t() + bias
    dtype = torch.bfloat16 if bf16 else torch.float32
    logits = exact + ((hidden.to(dtype) @ weight.to(dtype).t() + bias.to(dtype)).float() - exact).detach()
    ((logits * scale).log_softmax(-1)[torch.arange(n), targets] * upstream).sum().backward()
    assert torch.allclose(grad, hidden.grad, atol=1e-5)
    # TRL's tiles round (onehot - softmax) x upstream and the weight to bf16 under autocast: only close there.
    assert torch.allclose(grad_trl, hidden.grad, atol=0.05 if bf16 else 1e-5)
