"""`vlm-peft serve` against the real openai client, on a briefly trained tiny model: answers equal `vlm-peft
chat`'s, streaming joins to the same text, every bad request is its 4xx and the server keeps serving, a full
queue is a 429, and the web page works in headless Chromium."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from vlm_peft import VLMConfig, VLMProcessor, attach, detach, load, save_adapter
from vlm_peft.serving.chat import Chat
from vlm_peft.serving.generation import TextFilter, generate_turn, generation_kwargs, render
from vlm_peft.tiny import tiny_clip_config, tiny_image_processor, tiny_qwen3

from .conftest import make_image

pytestmark = pytest.mark.slow  # two subprocesses (serve, chat) and a browser: ~1.5 CPU-minutes on 2 cores

if os.environ.get("VLM_PEFT_REQUIRE_OPTIONAL"):  # scripts/test.sh installs them: a skip there would hide a break
    import fastapi  # noqa: F401
    import httpx
    import openai
else:
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
from vlm_peft.serving.openai_schema import Limits  # noqa: E402 - needs the [serve] extra
from vlm_peft.serving.server import BackgroundServer, ServeConfig, create_app  # noqa: E402

MAX_TOKENS = 24
QUESTION = "What colour is the shape?"
# The subprocess server's limits, small enough to reach with small requests.
MAX_IMAGES, MAX_IMAGE_MB, MAX_PIXELS, MAX_PROMPT = 2, 0.05, 300 * 300, 120
CONTEXT = 160  # the tiny model's max_position_embeddings
N = 4  # image tokens: the tiny tower's 16 patches in 2x2 groups


# (colour, question, answer) the tiny model learns by heart: multi-word answers that end with <|im_end|>.
LESSONS = [
    ((215, 30, 30), QUESTION, "A red circle."),
    ((35, 75, 220), QUESTION, "A blue square."),
    ((30, 160, 50), "Describe the image.", "The picture shows a green triangle on a white background."),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """A tiny random Qwen3 + CLIP, LLM and projector trained on LESSONS (60 steps, a few CPU seconds), saved as
    an adapter dir on a saved base: what `vlm-peft serve` and `vlm-peft chat` load."""
    root = tmp_path_factory.mktemp("serve")
    processor = VLMProcessor(tiny_image_processor(32), tokenizer, num_image_tokens=N)
    config = VLMConfig(
        vision_model=None,
        vision_config=tiny_clip_config(),
        num_image_tokens=N,
        projector_layers=2,
        projector_heads=4,
        projector_dropout=0.0,
        image_token_id=processor.image_token_id,
    )
    torch.manual_seed(0)
    tiny_qwen3(len(tokenizer), max_position_embeddings=CONTEXT).save_pretrained(root / "base")
    model = attach(AutoModelForCausalLM.from_pretrained(root / "base"), config)
    model.requires_grad_(True)
    images, batches = [], []
    for i, (colour, question, answer) in enumerate(LESSONS):
        image = make_image(colour, (48, 48))
        images.append(root / f"image{i}.png")
        image.save(images[-1])
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor(text=processor.apply_chat_template(turn, add_generation_prompt=True), images=[image])
        batch = processor(text=processor.apply_chat_template([*turn, {"role": "assistant", "content": answer}]),
                          images=[image])  # fmt: skip
        labels = batch["input_ids"].clone()
        labels[:, : prompt["input_ids"].shape[1]] = -100  # the answer and <|im_end|> only
        batches.append((batch, labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(20):
        for batch, labels in batches:
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    adapter = save_adapter(model, root / "adapter", processor=processor)
    detach(model).save_pretrained(root / "base")  # the trained LLM is the base the adapter names
    return adapter, images


@pytest.fixture(scope="module")
def loaded(trained):
    model, processor = load(trained[0])
    return model, processor


def data_url(image: Image.Image | Path, fmt: str = "PNG") -> str:
    if isinstance(image, Path):
        data = image.read_bytes()
    else:
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        data = buffer.getvalue()
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode()


def user(text: str, *images: Image.Image | Path) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def reference(loaded, turns: list[tuple[str, list[Path]]], *, think: bool = False, max_tokens: int = MAX_TOKENS):
    """`vlm-peft chat`'s answers, in process: the same Chat class, greedy."""
    model, processor = loaded
    chat = Chat(model, processor, think=think, **generation_kwargs(max_tokens, 0.0, 0.8))
    answers = []
    for text, images in turns:
        for image in images:
            chat.add_image(image)
        answers.append(chat.ask(text, out=io.StringIO()))
    return answers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """`vlm-peft serve` in a subprocess, as a user starts it."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    command = [sys.executable, "-m", "vlm_peft.cli", "serve", str(trained[0]), "--port", str(port)]
    command += ["--served-model-name", "tiny", "--max-images", str(MAX_IMAGES), "--max-image-mb", str(MAX_IMAGE_MB)]
    command += ["--max-image-pixels", str(MAX_PIXELS), "--max-prompt-tokens", str(MAX_PROMPT)]
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            assert proc.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@functools.lru_cache
def client(url: str) -> openai.OpenAI:
    # The client's retries cover a pooled connection that the server closed (uvicorn's keep-alive is 5 s, and
    # tests pause longer than that); they never retry a 4xx but a 429, which the queue test asks without them.
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=2, timeout=120)


def ask(url: str, messages: list[dict], **kwargs):
    return client(url).chat.completions.create(model="tiny", messages=messages, **{"max_tokens": MAX_TOKENS, **kwargs})


def test_answers_equal_vlm_peft_chat(server, trained, loaded):
    model_dir, images = trained
    done = subprocess.run(
        [sys.executable, "-m", "vlm_peft.cli", "chat", str(model_dir), "--image", str(images[0]), "--prompt", QUESTION]
        + ["--max-new-tokens", str(MAX_TOKENS)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    cli_answer = done.stdout.strip()
    assert cli_answer  # a trained model says something; an empty answer would make every comparison vacuous
    assert [m.id for m in client(server).models.list().data] == ["tiny"]
    reply = ask(server, [user(QUESTION, images[0])])
    assert reply.choices[0].message.content == cli_answer
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    # Several turns, images in two of them: the conversation as `vlm-peft chat` keeps it.
    turns = [(QUESTION, [images[0]]), ("Describe the image.", [images[1]]), ("What shape is this?", [])]
    expected = reference(loaded, turns)
    assert expected[0] == cli_answer
    messages = []
    for (text, imgs), answer in zip(turns, expected):
        messages.append(user(text, *imgs))
        got = ask(server, messages).choices[0].message.content
        assert got == answer
        messages.append({"role": "assistant", "content": got})


def test_usage_finish_reason_and_thinking(server, trained, loaded):
    model, processor = loaded
    image = trained[1][0]
    for think in (False, True):
        extra = {"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}} if think else {}
        reply = ask(server, [user(QUESTION, image)], **extra)
        content = [{"type": "image", "image": Image.open(image)}, {"type": "text", "text": QUESTION}]
        inputs = render(processor, [{"role": "user", "content": content}], think=think)
        turn = generate_turn(model, processor, inputs, **generation_kwargs(MAX_TOKENS, 0.0, 0.8))
        assert inputs["input_ids"].shape[1] > processor.num_image_tokens  # image tokens are counted
        assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1]
        assert reply.usage.completion_tokens == turn.completion_tokens
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert reply.choices[0].finish_reason == turn.finish_reason
        assert reply.choices[0].message.content == reference(loaded, [(QUESTION, [image])], think=think)[0]
        if not think:
            plain = reply.usage.prompt_tokens
    assert reply.usage.prompt_tokens < plain  # thinking mode drops the empty think block from the prompt
    short = ask(server, [user(QUESTION, image)], max_tokens=2)
    assert turn.completion_tokens > 2
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_streamed_chunks_join_to_the_answer(server, trained):
    image = trained[1][1]
    whole = ask(server, [user(QUESTION, image)])
    stream = ask(server, [user(QUESTION, image)], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # streamed, not one piece
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    # The wire format itself: SSE `data:` lines ending in [DONE].
    body = {"model": "tiny", "messages": [user(QUESTION, image)], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_stop_strings_and_seed(server, trained):
    image = trained[1][0]
    answer = ask(server, [user(QUESTION, image)]).choices[0].message.content
    assert len(answer) >= 3
    stop = answer[1:3]
    expected = answer[: answer.index(stop)].rstrip()
    cut = ask(server, [user(QUESTION, image)], stop=[stop, "never appears"])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    streamed = ask(server, [user(QUESTION, image)], stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    # Stops are matched in the answer only: the prompt ends in "\n", so "\n" + the answer's first letter
    # would end generation after one token if the match ran across the prompt's end (as `stop_strings` does).
    spanning = ask(server, [user(QUESTION, image)], stop=["\n" + answer[0]])
    assert spanning.choices[0].message.content == answer
    sampled = [ask(server, [user(QUESTION, image)], temperature=1.5, seed=s).choices[0].message.content
               for s in (1, 1, 2, 3, 4)]  # fmt: skip
    assert sampled[0] == sampled[1]  # a seed repeats
    assert len(set(sampled)) > 1  # and sampling samples


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def bad_requests(path: Path) -> dict[str, tuple[dict | bytes, int, str | None]]:
    """name -> (request body, expected status, expected `param` or error code); `path`: an image file."""
    red = Image.new("RGB", (40, 30), (200, 0, 0))
    good = user(QUESTION, red)
    ok = {"model": "tiny", "messages": [good], "max_tokens": 4}
    noise = Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3))  # ~120 KB as PNG: over 0.05 MiB
    small_png = png_bytes(red)

    def with_image(url: str) -> dict:
        return {**ok, "messages": [{"role": "user", "content": [image_part(url), {"type": "text", "text": "Hi"}]}]}

    return {
        "malformed JSON": (b'{"model": "tiny", "messages": [', 400, "invalid_json"),
        "body not an object": (b"[1, 2]", 400, None),
        "no messages": ({"model": "tiny"}, 400, "messages"),
        "empty messages": ({"model": "tiny", "messages": []}, 400, "messages"),
        "unknown model": ({**ok, "model": "gpt-4o"}, 404, "model"),
        "n > 1": ({**ok, "n": 2}, 400, "n"),
        "unsupported parameter": ({**ok, "tools": []}, 400, "tools"),
        "temperature out of range": ({**ok, "temperature": 3}, 400, "temperature"),
        "max_tokens not an integer": ({**ok, "max_tokens": "many"}, 400, "max_tokens"),
        "five stop strings": ({**ok, "stop": list("abcde")}, 400, "stop"),
        "unknown role": ({**ok, "messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages[0].role"),
        "unknown part type": (
            {**ok, "messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
            400,
            "messages[0].content[0]",
        ),
        "image in an assistant message": (
            {
                **ok,
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": [image_part(b64(small_png))]},
                ],
            },
            400,
            "messages[1].content[0]",
        ),
        "thinking kwarg not a bool": (
            {**ok, "chat_template_kwargs": {"enable_thinking": "yes"}},
            400,
            "chat_template_kwargs.enable_thinking",
        ),
        "other template kwargs": ({**ok, "chat_template_kwargs": {"tokenize": True}}, 400, "chat_template_kwargs"),
        "remote URL": (with_image("https://example.com/cat.png"), 400, "remote_url"),
        "local path without the flag": (with_image(str(path)), 400, "local_file"),
        "file URL without the flag": (with_image(path.resolve().as_uri()), 400, "local_file"),
        "data URL without base64": (with_image("data:image/png,abc"), 400, "invalid_image"),
        "bad base64": (with_image("data:image/png;base64,@@@notbase64@@@"), 400, "invalid_image"),
        "not an image": (with_image(b64(b"just some text, no pixels", "image/png")), 400, "invalid_image"),
        "truncated image": (with_image(b64(png_bytes(noise)[:3000])), 400, "invalid_image"),
        "not an image type": (with_image(b64(small_png, "text/plain")), 400, "invalid_image"),
        "too many images": (
            {**ok, "messages": [user("Compare", *[red] * MAX_IMAGES), good]},
            400,
            "too_many_images",
        ),
        "image too many bytes": (with_image(b64(png_bytes(noise))), 400, "image_too_large"),
        "image too many pixels": (with_image(b64(png_bytes(Image.new("RGB", (400, 400))))), 400, "image_too_large"),
        "prompt too long": ({**ok, "messages": [user("red " * 200, red)]}, 400, "prompt_too_long"),
        "max_tokens past the context": ({**ok, "max_tokens": 250}, 400, "context_length_exceeded"),
        "stream with a bad image": ({**with_image("https://x/y.png"), "stream": True}, 400, "remote_url"),
        "body too large": (b"x" * (4 * 2**20), 413, "request_too_large"),
        "deeply nested JSON": (b"[" * 100_000, 400, "invalid_json"),
        "temperature NaN": (json.dumps(ok)[:-1].encode() + b', "temperature": NaN}', 400, "temperature"),
        "seed out of range": ({**ok, "seed": 2**64}, 400, "seed"),
        "stop string too long": ({**ok, "stop": "x" * 300}, 400, "stop"),
        "image too elongated": (with_image(b64(png_bytes(Image.new("RGB", (400, 4))))), 400, "image_too_large"),
        "text far past the prompt limit": (
            {**ok, "messages": [{"role": "user", "content": "x" * (16 * MAX_PROMPT + 1)}]},
            400,
            "prompt_too_long",
        ),
    }


BAD = sorted(bad_requests(Path("image.png")))


@pytest.mark.parametrize("name", BAD)
def test_bad_request_is_its_4xx_and_the_server_keeps_serving(server, trained, name):
    body, status, what = bad_requests(trained[1][0])[name]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        server + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if what is not None:
        assert what in (error["param"], error["code"]), error
    if isinstance(body, dict) and "messages" in body:
        # The openai client gets the same answer for the same request.
        extra = {k: v for k, v in body.items() if k not in ("model", "messages", "stream")}
        with pytest.raises(openai.APIStatusError) as info:
            client(server).chat.completions.create(
                model=body["model"], messages=body["messages"], stream=body.get("stream", False), extra_body=extra
            )
        assert info.value.status_code == status and info.value.body == error
    assert ask(server, [user(QUESTION, trained[1][0])], max_tokens=2).choices[0].message.content == "A red"


def test_unknown_routes_and_models_answer_404_json(server):
    assert httpx.get(server + "/v1/nothing").json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("gpt-4o")
    assert client(server).models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client(server).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])


@pytest.fixture()
def in_process(loaded, monkeypatch):
    """The app in this process, local files allowed, one request may wait. Generation waits for `gate`;
    `entered` says one has started; `calls` holds each generation's number of new tokens."""
    model, processor = loaded
    held = SimpleNamespace(gate=threading.Event(), entered=threading.Event(), calls=[])
    real = model.generate

    def generate(*args, **kwargs):
        held.entered.set()
        assert held.gate.wait(60), "the test never opened the gate"
        out = real(*args, **kwargs)
        held.calls.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    held.gate.set()
    monkeypatch.setattr(model, "generate", generate)  # attach() wraps generate on the instance: restore that one
    config = ServeConfig(model_name="tiny", limits=Limits(allow_local_files=True), max_queue=1)
    try:
        with BackgroundServer(create_app(model, processor, config)) as running:
            held.url = running.url
            yield held
    finally:
        held.gate.set()


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_full_queue_is_429_and_local_files_need_the_flag(in_process, trained, loaded):
    url = in_process.url
    image = trained[1][0]
    expected = reference(loaded, [(QUESTION, [image])])[0]
    local = {"role": "user", "content": [image_part(str(image)), {"type": "text", "text": QUESTION}]}
    assert ask(url, [local]).choices[0].message.content == expected
    as_uri = {"role": "user", "content": [image_part(image.resolve().as_uri()), {"type": "text", "text": QUESTION}]}
    assert ask(url, [as_uri]).choices[0].message.content == expected
    missing = {"role": "user", "content": [image_part("/no/such/image.png"), {"type": "text", "text": "Hi"}]}
    with pytest.raises(openai.BadRequestError, match="no such file"):
        ask(url, [missing])

    in_process.gate.clear()
    in_process.entered.clear()
    results: dict[str, str] = {}

    def background(name: str) -> None:
        results[name] = ask(url, [user(QUESTION, image)]).choices[0].message.content

    first = threading.Thread(target=background, args=("first",))
    first.start()
    assert in_process.entered.wait(60)  # generating (held)
    second = threading.Thread(target=background, args=("second",))
    second.start()
    wait_for(lambda: httpx.get(url + "/health").json()["queued"] == 1, "the second request to be queued")
    with pytest.raises(openai.RateLimitError) as info:
        client(url).with_options(max_retries=0).chat.completions.create(model="tiny", messages=[user(QUESTION, image)])
    assert info.value.status_code == 429 and info.value.body["code"] == "queue_full"
    in_process.gate.set()
    first.join(120)
    second.join(120)
    assert results == {"first": expected, "second": expected}
    assert ask(url, [user(QUESTION, image)]).choices[0].message.content == expected


def test_a_client_that_leaves_stops_its_generation_or_is_skipped(in_process, trained, loaded):
    url, calls = in_process.url, in_process.calls
    image = trained[1][0]
    expected = reference(loaded, [(QUESTION, [image])])[0]
    calls.clear()
    in_process.gate.clear()
    body = {"model": "tiny", "messages": [user(QUESTION, image)], "max_tokens": MAX_TOKENS, "stream": True}
    with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b:
        with a.stream("POST", url + "/v1/chat/completions", json=body) as running:
            assert next(running.iter_lines()).startswith("data: ")  # the role chunk; generation is held
            assert in_process.entered.wait(60)
            with b.stream("POST", url + "/v1/chat/completions", json=body) as waiting:
                assert next(waiting.iter_lines()).startswith("data: ")
                wait_for(lambda: httpx.get(url + "/health").json()["queued"] == 1, "the second request to be queued")
        # Both clients hung up: the running generation stops after its first token, the waiting one never runs.
    in_process.gate.set()
    wait_for(lambda: httpx.get(url + "/health").json() == {"status": "ok", "queued": 0, "running": False}, "idle")
    assert calls == [1]
    assert ask(url, [user(QUESTION, image)]).choices[0].message.content == expected
    assert len(calls) == 2 and calls[1] > 1  # a whole answer again


def test_a_non_streamed_client_that_leaves_stops_its_generation_or_is_skipped(in_process, trained, loaded):
    url, calls = in_process.url, in_process.calls
    image = trained[1][0]
    calls.clear()
    in_process.gate.clear()
    body = {"model": "tiny", "messages": [user(QUESTION, image)], "max_tokens": MAX_TOKENS}
    gone = []

    def leave_after(seconds: float) -> None:
        try:
            httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=seconds))
        except httpx.ReadTimeout:
            gone.append(seconds)

    running = threading.Thread(target=leave_after, args=(3.0,))
    running.start()
    assert in_process.entered.wait(60)
    waiting = threading.Thread(target=leave_after, args=(1.0,))
    waiting.start()
    wait_for(lambda: httpx.get(url + "/health").json()["queued"] == 1, "the second request to be queued")
    running.join(30), waiting.join(30)
    assert sorted(gone) == [1.0, 3.0]  # both clients hung up while generation was held
    time.sleep(0.5)  # the server polls for disconnects every 0.1 s
    in_process.gate.set()
    wait_for(lambda: httpx.get(url + "/health").json() == {"status": "ok", "queued": 0, "running": False}, "idle")
    assert calls == [1]  # the running one stopped after its first token, the waiting one never ran
    assert ask(url, [user(QUESTION, image)]).choices[0].message.content == reference(loaded, [(QUESTION, [image])])[0]


def test_text_filter_is_the_same_however_the_stream_is_split():
    text = "  \n Red circle. Then more text, STOP here and STOP again. \n"
    for stop in ([], ["STOP"], ["circle", "STOP"], [" \n"], ["Then more"]):
        whole = TextFilter(stop)
        expected = whole.feed(text) + whole.finish()
        for size in (1, 2, 3, 7):
            split = TextFilter(stop)
            pieces = [split.feed(text[i : i + size]) for i in range(0, len(text), size)] + [split.finish()]
            assert "".join(pieces) == expected, (stop, size)
    assert expected == "Red circle."
    plain = TextFilter([])
    assert plain.feed(text) + plain.finish() == text.strip()


def test_serve_without_the_extra_says_how_to_install_it(monkeypatch, caplog, trained):
    from vlm_peft.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    assert main(["serve", str(trained[0])]) == 2
    assert "pip install 'vlm-peft[serve]'" in caplog.text


def browser():
    """Headless Debian chromium through Selenium and Debian's chromedriver; no browser download."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium + chromedriver: apt-get install chromium chromium-driver (scripts/setup.sh)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_web_page_uploads_asks_streams_keeps_and_resets(server, trained, loaded):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    images = trained[1]
    turns = [(QUESTION, [images[0]]), ("What shape is this?", [])]
    expected = reference(loaded, turns)
    fresh = reference(loaded, [("What shape is this?", [images[2]])])[0]
    driver = browser()
    try:
        driver.set_page_load_timeout(30)
        driver.get(server + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        tokens = driver.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys(str(MAX_TOKENS))

        def say(text: str, image: Path | None, answers: int) -> str:
            if image is not None:
                driver.find_element(By.ID, "file").send_keys(str(image.resolve()))
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pending img"))
            driver.find_element(By.ID, "prompt").send_keys(text)
            driver.find_element(By.ID, "send").click()
            done = "#log .assistant[data-done]"
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) == answers)
            return driver.find_elements(By.CSS_SELECTOR, done)[-1].text

        driver.execute_script(  # counts the answer's text updates: a streamed answer arrives in several
            "window.pieces = 0; new MutationObserver(rs => rs.forEach(r => r.target.closest && "
            "r.target.closest('.assistant') && window.pieces++)).observe(document.getElementById('log'), "
            "{subtree: true, childList: true, characterData: true});"
        )
        assert say(QUESTION, images[0], 1) == expected[0]
        assert driver.execute_script("return window.pieces") >= 3
        assert driver.find_elements(By.CSS_SELECTOR, "#log .user img")  # the uploaded image is shown
        assert say("What shape is this?", None, 2) == expected[1]  # the conversation is kept
        driver.find_element(By.ID, "reset").click()
        assert driver.find_elements(By.CSS_SELECTOR, "#log .msg") == []
        assert say("What shape is this?", images[2], 1) == fresh  # and really cleared, not just hidden
        assert not driver.find_elements(By.CSS_SELECTOR, "#log .error")
    finally:
        driver.quit()
