"""The lmms-eval model (vlm_peft.integrations.lmms_eval), driven with lmms-eval's own `Instance`,
`ChatMessages`, model registry and evaluator on a tiny adapter dir: answers equal `vlm-peft chat`'s
greedy ones, stop strings cut and stop generation, log-likelihoods equal a hand-computed log-softmax
sum, and `--model vlm_peft` is found through the entry point that pyproject.toml declares."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from vlm_peft import add_lora, attach, save_adapter
from vlm_peft.serving.chat import Chat

from .conftest import make_image

ROOT = Path(__file__).resolve().parents[1]
_filters = warnings.filters[:]
try:
    import lmms_eval.api.model  # noqa: F401

    LMMS_EVAL_MISSING = ""
except ImportError as err:
    LMMS_EVAL_MISSING = f"lmms-eval is not importable ({err}); README: Benchmark with lmms-eval"
    if os.environ.get("VLM_PEFT_REQUIRE_OPTIONAL"):  # scripts/test.sh installs it: a skip there would hide a break
        raise
finally:
    warnings.filters[:] = _filters  # lmms_eval.utils ignores every warning, process-wide, on import
needs_lmms_eval = pytest.mark.skipif(bool(LMMS_EVAL_MISSING), reason=LMMS_EVAL_MISSING)
COLORS = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
DOCS = [
    {"question": "What is this?", "images": [make_image(COLORS[0])]},
    {"question": "Describe the image.", "images": [make_image(COLORS[1]), make_image(COLORS[2])]},
    {"question": "A red circle. What is this?", "images": []},
]
TASK, SPLIT = "shapes", "test"


def entry_point() -> tuple[str, str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    group = "lmms_eval.models"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][group]
    (name, value), *_ = declared.items()
    return name, value, group


def test_vlm_peft_never_needs_lmms_eval():
    # A subprocess: this one may hold lmms-eval already. None in sys.modules makes its import fail.
    code = (
        "import sys; sys.modules['lmms_eval'] = None\n"
        "import vlm_peft, vlm_peft.cli, vlm_peft.serving.chat, vlm_peft.integrations\n"
        "try:\n    import vlm_peft.integrations.lmms_eval\nexcept ImportError:\n    print('no lmms-eval')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no lmms-eval"


@needs_lmms_eval
def test_declared_entry_point_registers_both_classes(monkeypatch):
    from importlib.metadata import EntryPoint

    from lmms_eval.models.registry_v2 import ModelManifest, ModelRegistryV2

    from vlm_peft.integrations.lmms_eval import VLMPeft, VLMPeftSimple

    name, value, group = entry_point()
    assert (name, value) == ("vlm_peft", "vlm_peft.integrations:lmms_eval_manifest")
    assert isinstance(EntryPoint(name, value, group).load()(), ModelManifest)
    registry = ModelRegistryV2()
    # lmms-eval's own loader, fed our declared entry point instead of the installed metadata.
    monkeypatch.setattr(registry, "_select_entry_points", lambda g: [EntryPoint(name, value, g)] if g == group else [])
    registry.load_entrypoint_manifests(overwrite=True)
    assert registry.get_model_class("vlm_peft") is VLMPeft  # also checks is_simple against the layout
    assert registry.get_model_class("vlm_peft", force_simple=True) is VLMPeftSimple


@pytest.fixture()
def adapter(llm, processor, vlm_cfg, tmp_path):
    """An adapter dir as tests/test_merge.py makes it, with LoRA as loud as tests/test_generate.py's: the
    tiny random model then says varied, image-dependent things, not one letter over and over."""
    llm.save_pretrained(tmp_path / "base")
    model = add_lora(attach(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), vlm_cfg), r=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    return save_adapter(model, tmp_path / "adapter", processor=processor)


def make_lm(adapter, simple=False, **args):
    from vlm_peft.integrations.lmms_eval import VLMPeft, VLMPeftSimple

    arg_string = ",".join(f"{k}={v}" for k, v in {"pretrained": adapter, "device": "cpu", "dtype": "float32"}.items())
    cls = VLMPeftSimple if simple else VLMPeft
    # What lmms-eval's evaluator calls: model_args string + its own batch_size/device (None: not given).
    lm = cls.create_from_arg_string(arg_string, {"batch_size": args.pop("batch_size", None), "device": None, **args})
    lm.task_dict = {TASK: {SPLIT: DOCS}}
    return lm


def doc_to_messages(doc):
    return [
        {
            "role": "user",
            "content": [*({"type": "image", "url": i} for i in doc["images"])]
            + [{"type": "text", "text": doc["question"]}],
        }
    ]


def doc_to_visual(doc):
    return doc["images"]


def request(kind, args, doc_id=0):
    from lmms_eval.api.instance import Instance

    return Instance(kind, args, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def chat_request(doc_id, gen_kwargs):
    return request("generate_until", ("ctx", doc_to_messages, gen_kwargs, doc_id, TASK, SPLIT), doc_id)


def simple_request(doc_id, gen_kwargs):
    args = (DOCS[doc_id]["question"], gen_kwargs, doc_to_visual, doc_id, TASK, SPLIT)
    return request("generate_until", args, doc_id)


def greedy_reference(lm, doc, max_new_tokens):
    """The README's recipe: chat template, processor, `generate`, decode."""
    model, processor = lm.model, lm.processor
    prompt = processor.apply_chat_template(doc_to_messages(doc), add_generation_prompt=True)
    batch = processor(text=prompt, images=doc["images"] or None)
    ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=lm._end_ids)
    return processor.tokenizer.decode(ids[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@needs_lmms_eval
def test_generate_until_equals_chat_greedy_answer(adapter):
    lm = make_lm(adapter)
    greedy = {"max_new_tokens": 8, "temperature": 0, "do_sample": False}
    answers = lm.generate_until([chat_request(i, greedy) for i in range(len(DOCS))])
    for doc, answer in zip(DOCS, answers):
        assert answer == greedy_reference(lm, doc, 8)
        chat = Chat(lm.model, lm.processor, max_new_tokens=8, do_sample=False)
        chat.pending = list(doc["images"])
        assert answer.strip() == chat.ask(doc["question"], out=io.StringIO())
    assert len(set(answers)) > 1 and all(answers)  # guards the comparisons against empty answers
    # Batched (left padded, mixed image counts) and the simple layout give the same answers.
    assert make_lm(adapter, batch_size=3).generate_until([chat_request(i, greedy) for i in range(3)]) == answers
    simple = make_lm(adapter, simple=True, batch_size=2)
    assert simple.generate_until([simple_request(i, greedy) for i in range(3)]) == answers


def two_chars_first_seen_after(text, start):
    """A stop string that first occurs at or after `start`, without the replacement character of a
    partly decoded byte (its decoding depends on where decoding starts)."""
    for i in range(start, len(text) - 1):
        if "\ufffd" not in text[i : i + 2] and text.index(text[i : i + 2]) == i:
            return text[i : i + 2]
    raise AssertionError(f"no fresh two characters after {start} in {text!r}")


@needs_lmms_eval
def test_until_cuts_the_answer_and_stops_generation(adapter):
    lm = make_lm(adapter)
    full = lm.generate_until([chat_request(1, {"max_new_tokens": 24})])[0]
    stop = two_chars_first_seen_after(full, len(full) // 2)
    steps = []
    lm.model.get_input_embeddings().register_forward_hook(lambda *a: steps.append(1))
    for until in (stop, [stop], ["never said", stop]):
        steps.clear()
        cut = lm.generate_until([chat_request(1, {"max_new_tokens": 24, "until": until})])[0]
        assert cut == full[: full.index(stop)]
        assert len(steps) < 24  # stopped, not cut after 24 tokens
    other = two_chars_first_seen_after(full, 1)  # the earliest stop string wins, whatever its place in `until`
    cut = lm.generate_until([chat_request(1, {"max_new_tokens": 24, "until": [stop, other]})])[0]
    assert cut == full[: min(full.index(stop), full.index(other))]


def test_generation_kwargs_follow_lmms_eval_conventions():
    from vlm_peft.integrations.generation import generation_kwargs

    assert generation_kwargs({}, 32) == ([], {"max_new_tokens": 32, "do_sample": False, "num_beams": 1})
    assert generation_kwargs({"temperature": 0, "do_sample": True, "until": "\n\n"}, 8)[0] == ["\n\n"]
    assert generation_kwargs({"temperature": 0, "do_sample": True}, 8)[1]["do_sample"] is False
    sampled = generation_kwargs({"temperature": 0.7, "max_new_tokens": 5, "until": ["", "Q:"]}, 8)
    assert sampled == (
        ["Q:"],
        {"max_new_tokens": 5, "do_sample": True, "num_beams": 1, "temperature": 0.7, "top_p": 1.0, "top_k": 0},
    )
    assert generation_kwargs({"do_sample": True, "top_p": 0.9}, 8)[1]["temperature"] == 1.0
    assert generation_kwargs({"do_sample": False, "temperature": 0.5}, 8)[1]["do_sample"] is False
    with pytest.raises(ValueError, match="until"):
        generation_kwargs({"until": 3}, 8)


@needs_lmms_eval
def test_sampling_follows_the_seed(adapter):
    lm = make_lm(adapter)
    sample = {"max_new_tokens": 8, "temperature": 1.5, "top_p": 0.9}
    torch.manual_seed(1)
    first = lm.generate_until([chat_request(0, sample)])
    torch.manual_seed(1)
    assert lm.generate_until([chat_request(0, sample)]) == first


def hand_loglikelihood(lm, doc, continuation):
    """log P(continuation | prompt) from the model's full logits."""
    processor = lm.processor
    prompt = processor.apply_chat_template(doc_to_messages(doc), add_generation_prompt=True)
    batch = processor(text=prompt, images=doc["images"] or None)
    target = processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.cat([batch["input_ids"], torch.tensor([target])], dim=1)
    with torch.no_grad():
        logits = lm.model(input_ids=ids, pixel_values=batch.get("pixel_values")).logits[0]
    logprobs = logits[-len(target) - 1 : -1].log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(target)[:, None]).sum().item(), logits, target


@needs_lmms_eval
def test_loglikelihood_equals_hand_computed_and_greedy_flag(adapter):
    lm = make_lm(adapter)
    doc = DOCS[0]
    greedy_text = greedy_reference(lm, doc, 3)
    greedy_ids = lm.tokenizer(greedy_text, add_special_tokens=False)["input_ids"]
    assert len(greedy_ids) == 3  # the text re-encodes to the generated tokens
    _, logits, _ = hand_loglikelihood(lm, doc, greedy_text)
    runner_up = logits[-2].topk(2).indices[1].item()  # the last token swapped for the second best
    other_text = lm.tokenizer.decode(greedy_ids[:-1] + [runner_up])
    assert lm.tokenizer(other_text, add_special_tokens=False)["input_ids"] == greedy_ids[:-1] + [runner_up]

    def ll_request(doc_id, continuation):
        target = continuation if doc_id != 1 else (lambda d: continuation)  # doc_to_target: str or function
        return request("loglikelihood", (DOCS[doc_id]["question"], target, doc_to_visual, doc_id, TASK, SPLIT), doc_id)

    requests = [ll_request(0, greedy_text), ll_request(0, other_text), ll_request(1, " red"), ll_request(2, "A")]
    requests.append(request("loglikelihood", ("", " A blue square.")))  # lmms-eval's unconditional form
    results = lm.loglikelihood(requests)
    expected = [hand_loglikelihood(lm, DOCS[0], greedy_text)[0], hand_loglikelihood(lm, DOCS[0], other_text)[0]]
    expected += [hand_loglikelihood(lm, DOCS[1], " red")[0], hand_loglikelihood(lm, DOCS[2], "A")[0]]
    expected.append(hand_loglikelihood(lm, {"question": "", "images": []}, " A blue square.")[0])
    for (value, _), want in zip(results, expected):
        assert value == pytest.approx(want, abs=1e-4)
    assert results[0][1] is True and results[1][1] is False
    assert results[1][0] < results[0][0]
    # One right-padded forward for all five gives the same numbers; the simple class scores alike.
    batched = make_lm(adapter, simple=True, batch_size=5).loglikelihood(requests)
    for (value, flag), (want, want_flag) in zip(batched, results):
        assert value == pytest.approx(want, abs=1e-4) and flag == want_flag
    # score=nll: what lmms-eval's multiple_choice argmin wants.
    assert make_lm(adapter, score="nll").loglikelihood(requests[:2]) == [(-v, f) for v, f in results[:2]]


@needs_lmms_eval
def test_multi_round_builds_each_round_from_the_task(adapter):
    lm = make_lm(adapter)
    seen = []

    def rounds(doc, round_idx=None, previous_output=None, previous_round_info=None):
        if round_idx is None:
            return doc_to_messages(doc)
        seen.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, True, previous_output, None
        follow_up = {"question": "And now?", "images": [make_image(COLORS[2])]}
        return doc_to_messages(follow_up), False, previous_output, {"round": round_idx}

    greedy = {"max_new_tokens": 6}
    out = lm.generate_until_multi_round([request("generate_until_multi_round", ("", rounds, greedy, 0, TASK, SPLIT))])
    first = greedy_reference(lm, DOCS[0], 6)
    second = greedy_reference(lm, {"question": "And now?", "images": [make_image(COLORS[2])]}, 6)
    assert out == [[first, second]]
    assert seen == [(1, [first], None), (2, [first, second], {"round": 1})]

    # The simple layout: round 0 from the context and doc_to_visual, then doc_to_text's 5-tuples.
    def text_rounds(doc, previous_output=None, round_idx=None, previous_round_info=None):
        if round_idx == 2:
            return None, None, True, previous_output, None
        return [make_image(COLORS[2])], "And now?", False, previous_output, None

    args = (DOCS[0]["question"], greedy, doc_to_visual, text_rounds, 0, TASK, SPLIT)
    simple = make_lm(adapter, simple=True)
    assert simple.generate_until_multi_round([request("generate_until_multi_round", args)]) == [[first, second]]


@needs_lmms_eval
def test_bad_model_args_and_inputs_are_clear_errors(adapter, tmp_path):
    from vlm_peft.integrations.lmms_eval import VLMPeft

    with pytest.raises(ValueError, match="pretrained=DIR"):
        VLMPeft()
    with pytest.raises(ValueError, match=r"unknown model_args \['temprature'\]"):
        VLMPeft(pretrained=str(adapter), temprature=0)
    with pytest.raises(ValueError, match="dtype='fp8'"):
        VLMPeft(pretrained=str(adapter), dtype="fp8")
    with pytest.raises(ValueError, match="score='loss'"):
        VLMPeft(pretrained=str(adapter), score="loss")
    with pytest.raises(ValueError, match="batch_size='auto'"):
        VLMPeft(pretrained=str(adapter), batch_size="auto")
    lm = make_lm(adapter)

    def video(doc):
        return [{"role": "user", "content": [{"type": "video", "url": "clip.mp4"}, {"type": "text", "text": "Hi"}]}]

    with pytest.raises(ValueError, match="images only, but a message holds a video part"):
        lm.generate_until([request("generate_until", ("", video, {}, 0, TASK, SPLIT))])
    args = ("Hi", " A", lambda doc: ["clip.mp4"], 0, TASK, SPLIT)
    with pytest.raises(ValueError, match="not str 'clip.mp4'"):
        lm.loglikelihood([request("loglikelihood", args)])


EVAL_SCRIPT = """
import json, sys
import lmms_eval.evaluator as evaluator
from lmms_eval.tasks import TaskManager

if sys.argv[3] == "no-filelock-patch":
    # lmms-eval 0.7.3 patches filelock 3 internals (filelock._api), gone in filelock 4.
    evaluator._enable_reentrant_filelocks._patched = True
# lmms-eval 0.7.3 turns every response that is not text into str(): (logprob, is_greedy) pairs included,
# so its multiple-choice scoring fails for every model. Pass them through, as it already does lists.
unwrap = evaluator.unwrap_generation_output
scored = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], bool)
evaluator.unwrap_generation_output = lambda x: (x, None) if scored(x) else unwrap(x)
tasks = TaskManager(include_path=sys.argv[2], include_defaults=False)
out = {}
# multiple_choice takes the argmin of the scores: score=nll (README).
for task, simple, extra in (("shapes_gen", False, ""), ("shapes_mc", True, ",score=nll")):
    result = evaluator.simple_evaluate(model="vlm_peft", model_args=sys.argv[1] + extra, tasks=[task],
                                       task_manager=tasks, batch_size=2, force_simple=simple, log_samples=True)
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    out[task] = {"resps": [s["resps"] for s in samples], "results": result["results"][task]}
print("RESULT" + json.dumps(out))
"""

TASK_UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""

TASK_YAML = """
task: {name}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: {output_type}
doc_to_visual: !function shapes_utils.doc_to_visual
doc_to_text: !function shapes_utils.doc_to_text
"""


@pytest.mark.slow
@needs_lmms_eval
def test_lmms_eval_runs_the_model_found_through_the_entry_point(adapter, tmp_path):
    """lmms-eval's evaluator on two local tasks, in a process that finds `vlm_peft` only through the
    declared entry point (written as installed metadata): a generation task through the chat class,
    a multiple-choice task through the simple class (`force_simple`)."""
    import datasets

    questions = ["What colour is this?", "Is it red?", "Describe the image."]
    rows = {
        "image": [make_image(c) for c in COLORS],
        "question": questions,
        "answer": ["red", "blue", "green"],
        "label": [0, 1, 2],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "label": datasets.Value("int64"),
        }
    )
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(tmp_path / "data")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "shapes_utils.py").write_text(TASK_UTILS)
    gen = TASK_YAML.format(name="shapes_gen", data=tmp_path / "data", output_type="generate_until")
    gen += 'doc_to_target: answer\ngeneration_kwargs:\n  max_new_tokens: 8\n  temperature: 0\n  until: ["\\n\\n"]\n'
    gen += "metric_list:\n  - metric: exact_match\n"
    mc = TASK_YAML.format(name="shapes_mc", data=tmp_path / "data", output_type="multiple_choice")
    mc += 'doc_to_choice: ["red", "blue", "green"]\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
    (tasks / "shapes_gen.yaml").write_text(gen)
    (tasks / "shapes_mc.yaml").write_text(mc)
    name, value, group = entry_point()
    dist_info = tmp_path / "site" / "vlm_peft_entry_point-0.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: vlm-peft-entry-point\nVersion: 0.0\n")
    (dist_info / "entry_points.txt").write_text(f"[{group}]\n{name} = {value}\n")
    filelock3 = importlib.util.find_spec("filelock._api") is not None
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path / 'site'}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
    }
    model_args = f"pretrained={adapter},device=cpu,dtype=float32"
    script = textwrap.dedent(EVAL_SCRIPT)
    argv = [sys.executable, "-c", script, model_args, str(tasks), "filelock3" if filelock3 else "no-filelock-patch"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.split("RESULT", 1)[1])

    lm = make_lm(adapter)
    lm.task_dict = {"shapes": {"test": [{"question": q, "images": [make_image(c)]} for q, c in zip(questions, COLORS)]}}
    for doc_id, resps in enumerate(out["shapes_gen"]["resps"]):
        expected = greedy_reference(lm, lm.task_dict["shapes"]["test"][doc_id], 8).split("\n\n")[0]
        assert resps == [[expected]]  # per request, its list of responses
    scores = []
    for doc_id, resps in enumerate(out["shapes_mc"]["resps"]):
        args = [(questions[doc_id], f" {c}", doc_to_visual, doc_id, TASK, SPLIT) for c in ("red", "blue", "green")]
        expected = lm.loglikelihood([request("loglikelihood", a, doc_id) for a in args])
        assert [-r[0][0] for r in resps] == pytest.approx([e[0] for e in expected], abs=1e-4)  # nll = -logprob
        assert [r[0][1] for r in resps] == [e[1] for e in expected]
        scores.append(float(max(range(3), key=lambda i: expected[i][0]) == doc_id))
    assert out["shapes_mc"]["results"]["acc,none"] == pytest.approx(sum(scores) / 3)
