"""`vlm-peft serve` throughput with a tiny model: requests/s through the openai client (sequential, streamed,
and 4 concurrent clients, which the server's queue runs one at a time), side by side with the same turns
generated in process by `generate_turn` (what the server runs; no HTTP, no base64, no JSON).

Each request: one 64x64 PNG as a data: URL + a question, greedy, max_tokens 8. The model is random (the demo's
sizes: Qwen3 hidden 128 x 4 layers, CLIP 64 x 2 layers, 16 image tokens), so answers run to max_tokens unless
it happens to end its turn; the table gives the mean completion tokens of each row.

Run: `python -m bench.serve` (~1 min on 2 cores) or `--quick` (toy size, for CI).
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from vlm_peft import VLMConfig, VLMProcessor, attach, load, save_adapter
from vlm_peft.serving.generation import generate_turn, generation_kwargs, render
from vlm_peft.serving.server import BackgroundServer, ServeConfig, create_app
from vlm_peft.tiny import tiny_clip_config, tiny_image_processor, tiny_qwen3, tiny_tokenizer

MAX_TOKENS = 8
QUESTION = "What colour is the shape?"
CORPUS = ["What colour is the shape? A red circle. A blue square. Describe the image."] * 20


def sizes(quick: bool) -> dict:
    if quick:
        return dict(hidden=64, layers=2, clip=32, image_tokens=4, requests=4, repeats=1, clients=2)
    return dict(hidden=128, layers=4, clip=64, image_tokens=16, requests=20, repeats=3, clients=4)


def build(root: Path, s: dict) -> Path:
    """A random tiny adapter dir on a saved base, as training would leave one."""
    tokenizer = tiny_tokenizer(CORPUS)
    processor = VLMProcessor(tiny_image_processor(32), tokenizer, num_image_tokens=s["image_tokens"])
    torch.manual_seed(0)
    llm = tiny_qwen3(len(tokenizer), hidden_size=s["hidden"], layers=s["layers"], max_position_embeddings=256)
    llm.save_pretrained(root / "base")
    config = VLMConfig(
        vision_model=None,
        vision_config=tiny_clip_config(hidden_size=s["clip"]),
        num_image_tokens=s["image_tokens"],
        projector_layers=2,
        projector_heads=4,
        projector_dropout=0.0,
        image_token_id=processor.image_token_id,
    )
    model = attach(AutoModelForCausalLM.from_pretrained(root / "base"), config)
    return save_adapter(model, root / "adapter", processor=processor)


def image(i: int) -> Image.Image:
    return Image.new("RGB", (64, 64), ((i * 53) % 256, (i * 97) % 256, (i * 29) % 256))


def data_url(img: Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def message(i: int) -> dict:
    url = data_url(image(i))
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
    }


def timed(run: Callable[[], list[int]], n: int) -> tuple[float, float]:
    """(requests/s, mean completion tokens) of `run`, which does n requests and returns their token counts."""
    start = time.perf_counter()
    tokens = run()
    assert len(tokens) == n
    return n / (time.perf_counter() - start), statistics.mean(tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    s = sizes(parser.parse_args(argv).quick)
    n = s["requests"]
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = load(build(Path(tmp), s))
        gen = generation_kwargs(MAX_TOKENS, 0.0, 0.8)
        app = create_app(model, processor, ServeConfig(model_name="tiny", max_queue=64, max_tokens=MAX_TOKENS))
        with BackgroundServer(app) as server:
            import openai  # the dev extra; the server needs only fastapi + uvicorn

            # Retries: a pooled connection idle past uvicorn's 5 s keep-alive (the in-process row) may be reset.
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=2, timeout=300)

            def direct() -> list[int]:
                out = []
                for i in range(n):
                    messages = [{"role": "user", "content": [{"type": "image", "image": image(i)},
                                                             {"type": "text", "text": QUESTION}]}]  # fmt: skip
                    inputs = render(processor, messages, device=model.device)
                    out.append(generate_turn(model, processor, inputs, **gen).completion_tokens)
                return out

            def ask(i: int) -> int:
                reply = client.chat.completions.create(model="tiny", messages=[message(i)], max_tokens=MAX_TOKENS)
                return reply.usage.completion_tokens

            def sequential() -> list[int]:
                return [ask(i) for i in range(n)]

            def streamed() -> list[int]:
                out = []
                for i in range(n):
                    chunks = client.chat.completions.create(
                        model="tiny",
                        messages=[message(i)],
                        max_tokens=MAX_TOKENS,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    out.append([c for c in chunks][-1].usage.completion_tokens)
                return out

            def concurrent() -> list[int]:
                out: list[int] = []
                lock = threading.Lock()

                def one(k: int) -> None:
                    for i in range(k, n, s["clients"]):
                        tokens = ask(i)
                        with lock:
                            out.append(tokens)

                threads = [threading.Thread(target=one, args=(k,)) for k in range(s["clients"])]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(600)
                return out

            rows = {
                "in process (generate_turn)": direct,
                "server, sequential": sequential,
                "server, streamed": streamed,
                f"server, {s['clients']} concurrent clients": concurrent,
            }
            ask(0)  # warm-up: first-call costs of torch, tokenizers and the HTTP stack
            direct()
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
            for _ in range(s["repeats"]):  # interleaved, so load on a shared machine hits every row alike
                for name, run in rows.items():
                    results[name].append(timed(run, n))
    base = statistics.median(r for r, _ in results["in process (generate_turn)"])
    print(f"{n} requests x {s['repeats']} repeats, max_tokens {MAX_TOKENS}, Qwen3 hidden {s['hidden']} x "
          f"{s['layers']} layers, {s['image_tokens']} image tokens; medians")  # fmt: skip
    print(f"{'':40} {'requests/s':>10} {'ms/request':>10} {'vs in process':>13} {'tokens':>6}")
    for name, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        tokens = statistics.mean(t for _, t in runs)
        print(f"{name:40} {rate:10.1f} {1000 / rate:10.1f} {rate / base:12.2f}x {tokens:6.1f}")


if __name__ == "__main__":
    main()
