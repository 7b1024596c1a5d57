"""The `vlm-peft` command line."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from safetensors import SafetensorError

logger = logging.getLogger("vlm_peft")


def _train(args: argparse.Namespace) -> int:
    from .training.distributed import is_main
    from .training.recipe import load_recipe
    from .training.stages import train

    recipe = load_recipe(args.recipe, args.set or [])
    resume = {"auto": None, "yes": True, "no": False}[args.resume]
    results = train(recipe, stage=args.stage, resume=resume, overwrite=args.overwrite)
    if not is_main():
        return 0  # the main process reports
    rows = [("stage", "steps", "train loss", "held-out EM", "answer-token acc", "held-out loss", "trainable")]
    for name, m in results.items():
        rows.append(
            (
                name,
                str(m.get("steps", "")),
                f"{m['train_loss']:.4f}" if m.get("train_loss") is not None else "",
                f"{m['eval_exact_match']:.1%}" if "eval_exact_match" in m else "-",
                f"{m['eval_token_accuracy']:.1%}" if "eval_token_accuracy" in m else "-",
                f"{m['eval_loss']:.4f}" if "eval_loss" in m else "-",
                f"{m.get('projector', 0) + m.get('lora', 0):,}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    curves = [f"{name}: {m['loss_curve']}" for name, m in results.items() if m.get("loss_curve")]
    if curves:
        print("loss curves: " + ", ".join(curves))
    last = recipe.stage_dir(list(results)[-1]) if results else None
    if last is not None:
        prompt = shlex.quote(_example_prompt(recipe.stage(list(results)[-1])))
        print(f"\nadapter: {last}\n  chat:     vlm-peft chat {last} --image IMAGE --prompt {prompt}")
        print(f"  evaluate: vlm-peft eval {last} --data DATA.jsonl")
        print(f"  merge:    vlm-peft merge {last} {last}-merged")
        print(f"  in Python: model, processor = vlm_peft.load('{last}'); model.generate(**processor(...))")
    return 0


def _example_prompt(spec) -> str:
    """The stage's own first held-out question (its last user text), for the hints after training."""
    from .data.loading import first_row

    try:
        row = first_row(spec.data.eval or spec.data.train, spec.data.format)
        users = [m for m in row["messages"][:-1] if m["role"] == "user"]
        text = " ".join(p["text"] for p in users[-1]["content"] if p["type"] == "text")
    except (ValueError, OSError, IndexError):
        text = ""
    return " ".join(text.split()) or "QUESTION"


def _launch(nproc: int, argv: list[str]) -> int:
    from .training.distributed import launch

    if nproc < 1:
        raise SystemExit("vlm-peft: error: --nproc must be >= 1")
    rest, skip = [], False
    for arg in argv:  # the same command, without --nproc, in each process
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return launch(nproc, rest)


def _eval(args: argparse.Namespace) -> int:
    from .data.loading import load_rows
    from .serving.loading import load
    from .training.evaluate import evaluate, format_summary

    model, processor = load(args.model_dir, base=args.base, device=args.device)
    rows = load_rows(args.data)
    image_root = args.image_root or str(Path(args.data).parent)
    summary, predictions = evaluate(
        model,
        processor,
        rows,
        image_root,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_samples=args.max_samples,
    )
    out = Path(args.out or Path(args.model_dir) / "predictions.jsonl")
    with out.open("w") as handle:
        handle.writelines(json.dumps(p) + "\n" for p in predictions)
    print(format_summary(summary, title=f"{args.data}"))
    print(f"predictions: {out}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .serving.merge import merge

    out = merge(
        args.adapter_dir,
        args.out_dir,
        base=args.base,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        copy_vision=not args.reference_vision,
        overwrite=args.overwrite,
    )
    print(f"merged model: {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .serving.export import export

    out = export(
        args.model_dir,
        args.out_dir,
        format=args.format,
        base=args.base,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"{args.format} model: {out}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .serving.chat import Chat
    from .serving.generation import generation_kwargs
    from .serving.loading import load

    model, processor = load(args.model_dir, base=args.base, device=args.device)
    chat = Chat(
        model, processor, think=args.think, **generation_kwargs(args.max_new_tokens, args.temperature, args.top_p)
    )
    for image in args.image or []:
        chat.add_image(image)
    if args.prompt is not None:
        chat.ask(args.prompt)
        return 0
    chat.repl(sys.stdin)
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        logger.error("vlm-peft serve needs FastAPI and uvicorn (%s): pip install 'vlm-peft[serve]'", err)
        return 2
    from .serving.loading import load
    from .serving.openai_schema import Limits
    from .serving.server import ServeConfig, create_app, serve

    for name in ("max_queue", "max_images", "max_image_mb", "max_image_pixels", "max_tokens", "max_prompt_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    model, processor = load(args.model_dir, base=args.base, device=args.device)
    limits = Limits(
        max_images=args.max_images,
        max_image_bytes=int(args.max_image_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
        max_prompt_tokens=args.max_prompt_tokens,
        allow_local_files=args.allow_local_files,
    )
    config = ServeConfig(
        model_name=args.served_model_name or args.model_dir,
        limits=limits,
        max_queue=args.max_queue,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    logger.info("serving %s as %r: chat page http://%s:%d/", args.model_dir, config.model_name, args.host, args.port)
    serve(create_app(model, processor, config), host=args.host, port=args.port)
    return 0


# Tools with their own argument parsers: `vlm-peft data TOOL ARGS…` hands ARGS (--help included) to them.
PASSTHROUGH = {
    "convert": "convert MiniMind-V / LLaVA / ShareGPT / OpenAI / caption data to the canonical format",
    "check": "validate a canonical dataset (images, structure, roles, lengths)",
    "synth": "write a synthetic task dataset (the shapes demo; glyphs, counting, spatial, compare)",
    "tokenizer": "train a tiny byte-level BPE (Qwen3's special tokens) on the texts of datasets",
}


def _cache_features(args: argparse.Namespace) -> int:
    from .training.cache import cache_stage_features
    from .training.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set or [])
    counts = cache_stage_features(recipe, args.stage, args.out, args.batch_size, args.dtype)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


def _passthrough(tool: str, rest: list[str]) -> int:
    import importlib

    module = importlib.import_module(f"data_tools.{tool}")
    return module.main(rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-peft", description=__doc__, allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the stages of a YAML recipe")
    t.add_argument("recipe")
    t.add_argument("--stage", help="run only this stage (the ones before it must be done)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. stages.sft.args.max_steps=10")
    t.add_argument(
        "--resume",
        choices=["auto", "yes", "no"],
        default="auto",
        help="continue from the last checkpoint (auto: when one exists)",
    )
    t.add_argument("--overwrite", action="store_true", help="retrain stages that are already done")
    t.add_argument(
        "--nproc", type=int, metavar="N", help="run N processes on this machine (torchrun; one per GPU, or gloo on CPU)"
    )
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="greedy exact match and loss of an adapter dir on a dataset")
    e.add_argument("model_dir")
    e.add_argument("--data", required=True, help="JSONL / JSON / parquet / saved dataset in the canonical format")
    e.add_argument("--image-root", help="default: the data file's folder")
    e.add_argument("--base", help="base model dir or hub id (default: the one the adapter names)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--max-samples", type=int)
    e.add_argument("--out", help="predictions JSONL (default: MODEL_DIR/predictions.jsonl)")
    e.add_argument("--device", help="e.g. cuda; default: CPU")
    e.set_defaults(func=_eval)

    m = sub.add_parser("merge", help="fold LoRA into the base and write a self-contained merged dir")
    m.add_argument("adapter_dir")
    m.add_argument("out_dir")
    m.add_argument("--base", help="base model dir or hub id (default: the one the adapter names)")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the merged weights")
    m.add_argument("--max-shard-size", default="2GB")
    m.add_argument("--reference-vision", action="store_true", help="name the vision tower instead of copying it")
    m.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    m.set_defaults(func=_merge)

    x = sub.add_parser("export", help="write a merged model as a transformers LLaVA checkpoint (vLLM, SGLang)")
    x.add_argument("model_dir", help="adapter dir or merged dir")
    x.add_argument("out_dir")
    x.add_argument(
        "--format",
        choices=["llava", "vlm-peft"],
        default="llava",
        help="llava: LlavaForConditionalGeneration + LlavaProcessor (mlp projector only); vlm-peft: the merged dir",
    )
    x.add_argument("--base", help="base model for an adapter dir (default: the one it names)")
    x.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the base model's")
    x.add_argument("--max-shard-size", default="2GB")
    x.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    x.set_defaults(func=_export)

    c = sub.add_parser("chat", help="talk to a merged or adapter dir about images")
    c.add_argument("model_dir")
    c.add_argument("--image", action="append", help="image for the first message (repeatable)")
    c.add_argument("--prompt", help="answer this once and exit (otherwise: interactive, /image PATH adds images)")
    c.add_argument("--base", help="base model for an adapter dir (default: the one it names)")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    c.add_argument("--top-p", type=float, default=0.8)
    c.add_argument("--think", action="store_true", help="Qwen3 thinking mode (off: an empty think block)")
    c.add_argument("--device", help="e.g. cuda; default: CPU")
    c.set_defaults(func=_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server + web chat page (pip install 'vlm-peft[serve]')")
    s.add_argument("model_dir")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="the model name clients send (default: MODEL_DIR as given)")
    s.add_argument("--base", help="base model for an adapter dir (default: the one it names)")
    s.add_argument("--device", help="e.g. cuda; default: CPU")
    s.add_argument("--allow-local-files", action="store_true", help="also take image paths, file:// URLs")
    s.add_argument("--max-queue", type=int, default=16, help="requests that may wait while one generates (then 429)")
    s.add_argument("--max-images", type=int, default=8, help="images per request (the whole conversation)")
    s.add_argument("--max-image-mb", type=float, default=20.0, help="encoded size of one image, MiB")
    s.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="width x height of one image")
    s.add_argument("--max-prompt-tokens", type=int, help="image tokens included (default: the model's context)")
    s.add_argument("--max-tokens", type=int, default=256, help="new tokens when a request names no max_tokens")
    s.add_argument("--temperature", type=float, default=0.0, help="when a request names none; 0: greedy")
    s.add_argument("--top-p", type=float, default=0.8, help="when a request names none")
    s.set_defaults(func=_serve)

    d = sub.add_parser("data", help="dataset tools: " + ", ".join([*PASSTHROUGH, "cache-features"]))
    tools = d.add_subparsers(dest="tool", required=True)
    for name, text in PASSTHROUGH.items():  # listed for --help; main() hands their arguments over
        tools.add_parser(name, help=text, add_help=False)
    cf = tools.add_parser("cache-features", help="encode a stage's images once with the frozen tower")
    cf.add_argument("recipe")
    cf.add_argument("--stage", required=True)
    cf.add_argument("--out", help="cache dir (default: the stage's data.features)")
    cf.add_argument("--set", action="append", metavar="KEY=VALUE")
    cf.add_argument("--batch-size", type=int, default=32)
    cf.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    cf.set_defaults(func=_cache_features)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = 0
    while flags < len(argv) and argv[flags] in ("-v", "--verbose"):
        flags += 1
    command = argv[flags : flags + 2]
    if len(command) == 2 and command[0] == "data" and command[1] in PASSTHROUGH:
        level = logging.DEBUG if flags else logging.INFO
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        return _passthrough(command[1], argv[flags + 2 :])
    args = build_parser().parse_args(argv)
    if args.command == "train" and args.nproc is not None:
        try:
            return _launch(args.nproc, argv)
        except ValueError as err:
            logger.error("%s", err)
            return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, OSError, SafetensorError) as err:  # missing files, a full disk (safetensors' own error too)
        logger.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
