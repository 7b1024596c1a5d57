"""lmms-eval models for vlm-peft dirs: `lmms-eval --model vlm_peft --model_args pretrained=DIR --tasks ...`.

lmms-eval 0.7 finds plugin models through the entry-point group `lmms_eval.models`
(`vlm_peft.integrations:lmms_eval_manifest`). One model id has two classes, one per request layout
lmms-eval knows: `VLMPeft` (chat, the default) reads each document's `doc_to_messages`;
`VLMPeftSimple` (`--force_simple`) reads the context string and the `doc_to_visual` images. lmms-eval
builds log-likelihood requests (`output_type: loglikelihood` / `multiple_choice`) only for simple
models, so those tasks need `--force_simple`; both classes score them the same way.

A score is the sum of the continuation's token log-probs, as lmms-eval's `lmms.loglikelihood`
documents and its `perplexity` and `acc_mutual_info` metrics read it. Its `multiple_choice` scoring
(0.7.3) takes the argmin instead, because its own models return a loss: `score=nll` returns minus the
sum for those tasks.

Every prompt goes through the processor's chat template (Qwen3 format, images as content parts,
non-thinking unless `think=True`), as in `vlm-peft chat`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from PIL import Image
from tqdm import tqdm
from transformers import StoppingCriteriaList

from ..serving.generation import END_OF_TURN
from ..serving.loading import load
from .generation import StopStrings, cut_at_stops, generation_kwargs

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
SCORES = ("logprob", "nll")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".flv", ".m4v")
MAX_ROUNDS = 64  # a multi-round task that never signals its end must not hang the run


def user_turn(text: str, visuals: list[Any]) -> list[dict[str, Any]]:
    """The simple layout's prompt: the images first, then the task's context text."""
    content = [{"type": "image", "image": v} for v in visuals] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def images_of(messages: list[dict[str, Any]]) -> list[Any]:
    """The messages' images in reading order (the order their placeholders are filled)."""
    images = []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            kind = part.get("type")
            if kind == "image":
                images.append(check_visual(part.get("image", part.get("url"))))
            elif kind in ("video", "audio"):
                raise ValueError(f"vlm_peft reads images only, but a message holds a {kind} part; pick an image task.")
    return images


def check_visual(visual: Any) -> Any:
    if isinstance(visual, Image.Image):
        return visual
    if isinstance(visual, str) and not visual.lower().endswith(VIDEO_SUFFIXES):
        return visual  # an image path or URL: the processor opens it
    raise ValueError(f"vlm_peft reads images (PIL images or image paths), not {type(visual).__name__} {visual!r:.80}.")


def flat_visuals(visuals: Any) -> list[Any]:
    """doc_to_visual's output (a list, possibly nested one level, possibly with None) as a flat list."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    flat = [w for v in visuals for w in (v if isinstance(v, (list, tuple)) else [v])]
    return [check_visual(v) for v in flat if v is not None]


def pick_device(device: str | None) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device in (None, "", "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return torch.device(f"cuda:{local_rank}")  # one process per GPU under accelerate / torchrun
    return torch.device(device)


class _VLMPeftBase(lmms):
    """Loading, prompting, generation and scoring shared by both request layouts."""

    def __init__(
        self,
        pretrained: str | None = None,
        base: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int = 256,
        think: bool = False,
        system_prompt: str | None = None,
        score: str = "logprob",
        max_batch_size: int | None = None,  # lmms-eval passes it to every model; batches are fixed here
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown model_args {sorted(unknown)}; vlm_peft takes pretrained, base, device, dtype, batch_size, "
                "max_new_tokens, think, system_prompt, score."
            )
        if not pretrained:
            raise ValueError("model_args needs pretrained=DIR: a vlm-peft adapter dir or merged dir.")
        if str(dtype) not in DTYPES:
            raise ValueError(f"model_args dtype={dtype!r}: use one of {', '.join(DTYPES)}.")
        if score not in SCORES:
            raise ValueError(f"model_args score={score!r}: use logprob, or nll for multiple_choice tasks.")
        self.score = score
        try:
            self._batch_size = int(batch_size)
        except (TypeError, ValueError):
            self._batch_size = 0
        if self._batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a positive integer ('auto' is not supported).")
        self._device = pick_device(device)
        self._model, self.processor = load(pretrained, base=base, dtype=str(dtype), device=self._device)
        self.processor.tokenizer.padding_side = "left"  # generation appends on the right
        tokenizer = self.processor.tokenizer
        ends = [tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id]
        self._end_ids = list(dict.fromkeys(i for i in ends if i is not None))
        self.max_new_tokens = int(max_new_tokens)
        self.think = bool(think)
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))

    # Attributes lmms-eval's evaluator and other models' helpers read.
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def config(self) -> Any:
        return self._model.config

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def eot_token_id(self) -> int:
        return self._end_ids[0]

    @property
    def max_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    def tok_encode(self, string: str, left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        ids = self.tokenizer(string, add_special_tokens=False)["input_ids"]
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: int | list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # Per layout (subclasses).
    def _conversation(self, args: tuple) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _gen_kwargs(self, args: tuple) -> dict[str, Any]:
        raise NotImplementedError

    def _round(self, args: tuple, round_idx: int, outputs: list[str], info: Any) -> tuple | None:
        raise NotImplementedError

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _with_system(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        messages = [dict(m) for m in messages]  # tasks may hand out one shared list
        return self._apply_system_prompt(messages, self.system_prompt) if self.system_prompt else messages

    def _prompt(self, messages: list[dict[str, Any]]) -> str:
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, enable_thinking=self.think
        )

    def _generate(self, conversations: list[list[dict[str, Any]]], gen_kwargs: dict[str, Any]) -> list[str]:
        """One batched `generate` (left padded) for conversations that share gen_kwargs."""
        until, kwargs = generation_kwargs(gen_kwargs, self.max_new_tokens)
        images = [images_of(m) for m in conversations]  # first: it names a video part, the template would not
        batch = self.processor(text=[self._prompt(m) for m in conversations], images=images, padding=True)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        length = batch["input_ids"].shape[1]
        if until:
            kwargs["stopping_criteria"] = StoppingCriteriaList([StopStrings(self.tokenizer, until, length)])
        with torch.no_grad():
            out = self.model.generate(
                **batch, **kwargs, eos_token_id=self._end_ids, pad_token_id=self.tokenizer.pad_token_id
            )
        answers = self.tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
        return [cut_at_stops(a, until) for a in answers]

    def _batches(self, requests: list[Instance]) -> Iterator[list[int]]:
        """Request indices in batches of equal gen_kwargs (one `generate` call each), in first-seen order."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            key = json.dumps(self._gen_kwargs(request.args), sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                yield indices[start : start + self.batch_size]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), disable=self.rank != 0, desc="vlm_peft generate_until") as bar:
            for indices in self._batches(requests):
                gen_kwargs = self._gen_kwargs(requests[indices[0]].args)
                conversations = [self._conversation(requests[i].args) for i in indices]
                for i, answer in zip(indices, self._generate(conversations, gen_kwargs)):
                    results[i] = answer
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), answer)
                bar.update(len(indices))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """lmms-eval's multi-round protocol: each round the task builds a fresh prompt (holding what it
        wants of the earlier answers) until it signals the end; one answer per round."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="vlm_peft multi-round"):
            gen_kwargs = self._gen_kwargs(request.args)
            outputs: list[str] = []
            info = None
            for round_idx in range(MAX_ROUNDS):
                step = self._round(request.args, round_idx, outputs, info)
                if step is None:
                    break
                messages, outputs, info = step
                outputs = [*outputs, *self._generate([self._with_system(messages)], gen_kwargs)]
            else:
                raise ValueError(f"doc {request.doc_id} of {request.task_name} did not end in {MAX_ROUNDS} rounds.")
            results.append(outputs)
        return results

    def _scored_request(self, args: tuple) -> tuple[list[dict[str, Any]], str]:
        """(prompt messages, continuation) of a loglikelihood request: (context, continuation) for the
        unconditional ones lmms-eval adds, else (context, doc_to_target or the choice, doc_to_visual,
        doc_id, task, split)."""
        if len(args) == 2:
            context, continuation = args
            visuals: list[Any] = []
        else:
            context, target, doc_to_visual, doc_id, task, split = args[:6]
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            visuals = flat_visuals(doc_to_visual(doc)) if callable(doc_to_visual) else []
        if not isinstance(continuation, str):
            raise ValueError(f"loglikelihood continuation must be text, got {type(continuation).__name__}.")
        return self._with_system(user_turn(context, visuals)), continuation

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of the continuation's token log-probs, whether greedy decoding yields it) per request:
        the continuation's tokens follow the prompt's generation header, as an answer would; one
        forward per batch, the LM head only over the continuation positions."""
        if self.score == "logprob" and requests:
            logger.warning(
                "loglikelihood returns summed log-probs (score=logprob); lmms-eval's multiple_choice tasks pick the "
                "lowest value, so run those with model_args score=nll."
            )
        results: list[tuple[float, bool]] = []
        with tqdm(total=len(requests), disable=self.rank != 0, desc="vlm_peft loglikelihood") as bar:
            for start in range(0, len(requests), self.batch_size):
                chunk = requests[start : start + self.batch_size]
                results.extend(self._score([self._scored_request(r.args) for r in chunk]))
                bar.update(len(chunk))
        return results

    def _score(self, items: list[tuple[list[dict[str, Any]], str]]) -> list[tuple[float, bool]]:
        rows, pixels = [], []
        for messages, continuation in items:
            images = images_of(messages)
            encoded = self.processor(text=self._prompt(messages), images=images or None)
            target = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            rows.append((encoded["input_ids"][0].tolist(), target))
            if images:
                pixels.append(encoded["pixel_values"])
        if not any(target for _, target in rows):
            return [(0.0, True)] * len(rows)  # log P(empty) = 0, and greedy decoding "yields" it
        width = max(len(c) + len(t) for c, t in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (context, target) in enumerate(rows):  # right padding keeps every row's positions
            ids[r, : len(context) + len(target)] = torch.tensor(context + target)
            mask[r, : len(context) + len(target)] = 1
        # Position p's logits predict token p + 1: keep those that predict continuation tokens.
        first = min(len(c) for c, t in rows if t) - 1
        keep = torch.arange(first, width - 1, device=self.device)
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.device)
        with torch.no_grad():
            logits = self.model(**inputs, logits_to_keep=keep, use_cache=False).logits.float()
        logprobs = logits.log_softmax(-1)
        logits[..., self.processor.image_token_id] = float("-inf")  # greedy generation never emits it
        greedy = logits.argmax(-1)
        results = []
        for r, (context, target) in enumerate(rows):
            if not target:
                results.append((0.0, True))
                continue
            positions = torch.arange(len(context) - 1, len(context) + len(target) - 1, device=self.device) - first
            tokens = torch.tensor(target, device=self.device)
            total = float(logprobs[r, positions].gather(-1, tokens[:, None]).sum())
            results.append((total if self.score == "logprob" else -total, bool((greedy[r, positions] == tokens).all())))
        return results


class VLMPeft(_VLMPeftBase):
    """Chat layout: args (context, doc_to_messages, gen_kwargs, doc_id, task, split)."""

    is_simple = False

    def _gen_kwargs(self, args: tuple) -> dict[str, Any]:
        return dict(args[2] or {})

    def _conversation(self, args: tuple) -> list[dict[str, Any]]:
        _, doc_to_messages, _, doc_id, task, split = args
        return self._with_system(self._messages(doc_to_messages(self._doc(task, split, doc_id))))

    @staticmethod
    def _messages(raw: Any) -> list[dict[str, Any]]:
        return ChatMessages(messages=raw).to_hf_messages()

    def _round(self, args: tuple, round_idx: int, outputs: list[str], info: Any) -> tuple | None:
        _, doc_to_messages, _, doc_id, task, split = args
        doc = self._doc(task, split, doc_id)
        if round_idx == 0:
            return self._messages(doc_to_messages(doc)), outputs, info
        payload = doc_to_messages(doc, round_idx=round_idx, previous_output=list(outputs), previous_round_info=info)
        if not (isinstance(payload, tuple) and len(payload) == 4):
            return None  # a task without a multi-round protocol: one round
        raw, terminal, _, info = payload
        return None if terminal else (self._messages(raw), outputs, info)


class VLMPeftSimple(_VLMPeftBase):
    """Simple layout (`--force_simple`): args (context, gen_kwargs, doc_to_visual, doc_id, task, split);
    the images go before the context text in one user turn."""

    is_simple = True

    def _gen_kwargs(self, args: tuple) -> dict[str, Any]:
        return dict(args[1] or {})

    def _conversation(self, args: tuple) -> list[dict[str, Any]]:
        context, _, doc_to_visual, doc_id, task, split = args
        return self._with_system(user_turn(context, self._visuals(doc_to_visual, task, split, doc_id)))

    def _visuals(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int) -> list[Any]:
        return flat_visuals(doc_to_visual(self._doc(task, split, doc_id))) if callable(doc_to_visual) else []

    def _round(self, args: tuple, round_idx: int, outputs: list[str], info: Any) -> tuple | None:
        """Args (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split); from round 1 on
        doc_to_text returns (visuals, text, terminal, outputs so far, round info)."""
        context, _, doc_to_visual, doc_to_text, doc_id, task, split = args
        if round_idx == 0:
            return user_turn(context, self._visuals(doc_to_visual, task, split, doc_id)), outputs, info
        doc = self._doc(task, split, doc_id)
        visuals, text, terminal, outputs, info = doc_to_text(
            doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info
        )
        return None if terminal else (user_turn(text, flat_visuals(visuals)), list(outputs), info)
