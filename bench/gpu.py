"""Training throughput on one GPU at Qwen3-0.6B + CLIP ViT-B/16 size: stage 1 (projector only) and
stage 2 (projector + LoRA r=16) over batch sizes, with samples/s, tokens/s, peak memory and MFU, and
activation checkpointing on vs off at the largest batch that fits.

Why: the CPU benches say nothing about what a real run costs; this one tells how large a batch a GPU
takes and how well it is used, before a long run is started. Weights are random (built from configs,
nothing is downloaded); inputs are synthetic chat samples of one image (N placeholder tokens) and
~64 text tokens, all the same length (no padding). bf16 weights for the frozen LLM and tower, bf16
autocast, fp32 trainable projector / LoRA (as `attach` and PEFT make them), AdamW on what trains.

FLOPs per step ("model FLOPs": what the step needs, recompute under checkpointing not counted;
attention counted over the full S x S square as in PaLM, no causal discount; each matmul of
m x k by k x n is 2mkn):

  LLM forward  = B*S*(2*N_dec + 2*H*V) + B*4*L*S^2*A
                 N_dec: decoder Linear weights (non-embedding params); 2*H*V: the (tied) lm_head
                 matmul, which runs on every token; A = heads*head_dim (2048 for Qwen3-0.6B, not H).
  LLM backward = 1 x matmul part (frozen weights: activation gradients only, no weight gradients;
                 they must flow through every layer to reach the projector) + 2 x attention part.
  LoRA         = 3 x B*S*L*sum_modules 2*r*(in+out)     (stage 2: trainable, fwd + dX + dW)
  projector    = 3 x fwd - B*4*P*Dv*H   (trainable: fwd + dX + dW, except the dX of the two Linears
                 that read the frozen tower's output: the patch MLP's first, the key projection)
                 fwd/image = 2*P*Dv*H + 2*P*H^2 (the MLP on each patch) + 2*P*Dv*H (keys)
                             + layers*(8*P*H^2 + 4*P^2*H + 4*m*P*H^2) + 2*Q*r^2*H^2 (merge Linear;
                             r x r patches per token, r = 1 off the grid)
  tower        = 1 x fwd/image * B, no backward
                 fwd/image = 2*P*3*p^2*Dv + Lv*(8*T*Dv^2 + 4*T*Dv*Iv + 4*T^2*Dv), T = P + 1 (CLS)
  MFU = FLOPs per step / step time / peak dense bf16 FLOPs (PEAK_TFLOPS by GPU name, or --peak-tflops).

B batch, S sequence length, H/V/L LLM hidden/vocab/layers, Q queries (= image tokens), P patches,
Dv/Iv/Lv tower width/intermediate/layers, p patch size, m projector FFN multiplier. The formula is
checked against torch's FlopCounterMode on one step of each stage (printed; on CPU torch does not
count SDPA, and it never sees flash_attn's kernels).

Run: `python -m bench.gpu [--batch-sizes 1,2,4,8,16] [--steps 10] [--out results.json]` on a CUDA
machine, or `python -m bench.gpu --quick` (toy sizes on CPU, a few seconds; for CI, MFU "n/a").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3Config

import vlm_peft
from vlm_peft.model.checkpoint import unwrap
from vlm_peft.model.cross_attention import merge_factor
from vlm_peft.model.hooks import PROJECTOR_ATTR, get_state

# The docstring's formula, printed and written to the JSON (None under `python -OO`).
FORMULA = __doc__.split("FLOPs per step", 1)[1].split("\nRun:", 1)[0] if __doc__ else " formula: see bench/gpu.py"

# Peak dense bf16 tensor FLOPs (TFLOP/s) by a substring of torch.cuda.get_device_name(); first match
# wins, so more specific names come first ("H200 NVL" before "H200", "H100 PCIe" before "H100").
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("B200", 2250.0),
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
]


@dataclass(frozen=True)
class Sizes:
    """Model and sample sizes; the defaults are Qwen3-0.6B + CLIP ViT-B/16 + the recipe's projector."""

    hidden: int = 1024
    intermediate: int = 3072
    layers: int = 28
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 151936
    image: int = 224
    patch: int = 16
    width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    queries: int = 196
    projector_layers: int = 2
    projector_heads: int = 8
    ffn_mult: int = 4
    user_tokens: int = 16
    answer_tokens: int = 48
    lora_r: int = 16

    @property
    def patches(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def vision_intermediate(self) -> int:
        return 4 * self.width

    @property
    def seq_len(self) -> int:
        """Tokens per sample; must match `ChatIds.sample`'s layout (16 template + text + N image tokens)."""
        return self.queries + self.user_tokens + self.answer_tokens + 16


FULL = Sizes()
QUICK = Sizes(
    hidden=64,
    intermediate=128,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=16,
    vocab=512,
    image=32,
    patch=8,
    width=32,
    vision_layers=2,
    vision_heads=4,
    queries=16,
)


@dataclass(frozen=True)
class ChatIds:
    """Token ids of the chat template's fixed parts; Qwen3's real ids at full size, so the sample
    looks like what the processor makes (`<|im_start|>user\\n<|vision_start|>…`)."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    think: int
    end_think: int
    newline: int
    double_newline: int
    user: int
    assistant: int
    text_high: int  # ordinary text tokens are drawn from [0, text_high)

    @classmethod
    def for_vocab(cls, vocab: int) -> ChatIds:
        if vocab >= 151669:
            return cls(151644, 151645, 151652, 151653, 151655, 151667, 151668, 198, 271, 872, 77091, 151643)
        top = vocab - 8  # toy vocab: the special tokens are its last ids
        return cls(top, top + 1, top + 2, top + 3, top + 4, top + 5, top + 6, 10, 11, 12, 13, top)

    def sample(self, sizes: Sizes, generator: torch.Generator) -> list[int]:
        """One non-thinking chat sample: user turn with one image and a question, then the answer."""

        def text(n: int) -> list[int]:
            return torch.randint(0, self.text_high, (n,), generator=generator).tolist()

        ids = [self.im_start, self.user, self.newline, self.vision_start]
        ids += [self.image_pad] * sizes.queries + [self.vision_end] + text(sizes.user_tokens)
        ids += [self.im_end, self.newline, self.im_start, self.assistant, self.newline]
        ids += [self.think, self.double_newline, self.end_think, self.double_newline]
        ids += text(sizes.answer_tokens) + [self.im_end, self.newline]
        return ids


def make_batch(sizes: Sizes, ids: ChatIds, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """input_ids built directly (no tokenizer to download), labels with image slots masked, random pixels."""
    generator = torch.Generator().manual_seed(batch)
    input_ids = torch.tensor([ids.sample(sizes, generator) for _ in range(batch)], device=device)
    if input_ids.shape[1] != sizes.seq_len:
        raise AssertionError(f"sample layout gives {input_ids.shape[1]} tokens, Sizes.seq_len says {sizes.seq_len}")
    labels = input_ids.masked_fill(input_ids == ids.image_pad, -100)
    pixels = torch.randn(batch, 3, sizes.image, sizes.image, generator=generator).to(device=device, dtype=dtype)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels, "use_cache": False}


def vision_config(sizes: Sizes) -> dict[str, Any]:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": sizes.width,
        "intermediate_size": sizes.vision_intermediate,
        "num_hidden_layers": sizes.vision_layers,
        "num_attention_heads": sizes.vision_heads,
        "image_size": sizes.image,
        "patch_size": sizes.patch,
    }


def build_model(
    sizes: Sizes, ids: ChatIds, device: torch.device, dtype: torch.dtype, attn: str
) -> tuple[PreTrainedModel, vlm_peft.VisionTower]:
    """Random Qwen3 built straight on the device (no fp32 CPU copy of 0.6B params), tower cast to `dtype`."""
    cfg = Qwen3Config(
        vocab_size=sizes.vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        head_dim=sizes.head_dim,
        tie_word_embeddings=True,
        eos_token_id=ids.im_end,
    )
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    vlm_cfg = vlm_peft.VLMConfig(
        vision_model=None,  # build the tower from vision_config, never from the hub
        vision_config=vision_config(sizes),
        num_image_tokens=sizes.queries,
        projector_layers=sizes.projector_layers,
        projector_heads=sizes.projector_heads,
        projector_ffn_mult=sizes.ffn_mult,
        projector_dropout=0.0,
        image_token_id=ids.image_pad,
    )
    llm = vlm_peft.attach(llm, vlm_cfg)
    tower = get_state(llm).vision
    tower.to(device=device, dtype=dtype)
    return llm.train(), tower


# --- FLOPs -------------------------------------------------------------------------------------


def llm_linear_params(s: Sizes) -> int:
    """Decoder Linear weights (q/k/v/o + gate/up/down): the non-embedding params that do matmuls."""
    attn = s.heads * s.head_dim
    return s.layers * (2 * s.hidden * attn + 2 * s.hidden * s.kv_heads * s.head_dim + 3 * s.hidden * s.intermediate)


def lora_params(s: Sizes) -> int:
    """r * (in + out) summed over the LoRA'd modules: 2x this is LoRA's forward FLOPs per token."""
    attn, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    pairs = [(s.hidden, attn), (s.hidden, kv), (s.hidden, kv), (attn, s.hidden)]
    pairs += [(s.hidden, s.intermediate)] * 2 + [(s.intermediate, s.hidden)]
    return s.layers * sum(s.lora_r * (i + o) for i, o in pairs)


def step_flops(s: Sizes, batch: int, lora: bool) -> dict[str, dict[str, float]]:
    """Model FLOPs of one training step by part, each split into matmul and attention-score FLOPs
    (so the check against FlopCounterMode can compare them separately). See the module docstring."""
    b, seq, q, p, h = batch, s.seq_len, s.queries, s.patches, s.hidden
    llm_mm = b * seq * (2 * llm_linear_params(s) + 2 * h * s.vocab)
    llm_att = b * 4 * s.layers * seq**2 * s.heads * s.head_dim
    # Revision 2: the MLP on each patch, the key projection, the blocks over patches, the r x r merge.
    proj_mm = b * (
        2 * p * s.width * h
        + 2 * p * h * h
        + 2 * p * s.width * h
        + s.projector_layers * (8 * p * h * h + 4 * s.ffn_mult * p * h * h)
        + 2 * q * max(merge_factor(p, q), 1) ** 2 * h * h  # off the grid: over averaged patches
    )
    proj_att = b * s.projector_layers * 4 * p * p * h
    t = p + 1
    tower_mm = b * (
        2 * p * 3 * s.patch**2 * s.width
        + s.vision_layers * (8 * t * s.width**2 + 4 * t * s.width * s.vision_intermediate)
    )
    tower_att = b * s.vision_layers * 4 * t * t * s.width
    parts = {
        "tower fwd": {"matmul": tower_mm, "attention": tower_att},
        # No input gradient for the two layers that read the frozen tower's features.
        "projector fwd+bwd": {"matmul": 3 * proj_mm - b * 4 * p * s.width * h, "attention": 3 * proj_att},
        "LLM fwd": {"matmul": llm_mm, "attention": llm_att},
        "LLM bwd": {"matmul": llm_mm, "attention": 2 * llm_att},
    }
    if lora:
        parts["LoRA fwd+bwd"] = {"matmul": 3 * b * seq * 2 * lora_params(s), "attention": 0}
    return {k: {kk: float(vv) for kk, vv in v.items()} for k, v in parts.items()}


def total_flops(parts: dict[str, dict[str, float]]) -> float:
    return sum(sum(v.values()) for v in parts.values())


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The GPU's dense bf16 peak, from --peak-tflops or the table; None (MFU "n/a") when unknown."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no GPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value, f"table ({key})"
    return None, f"{name!r} not in the table; pass --peak-tflops"


# --- running -----------------------------------------------------------------------------------


@dataclass
class Result:
    config: str
    batch: int
    status: str = "ok"  # or "OOM"
    step_s: float | None = None
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    peak_mem_bytes: int | None = None
    flops_per_step: float | None = None
    mfu: float | None = None


class Bench:
    """Holds the model and device state so each config starts from the same clean memory."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> None:
        self.args, self.sizes, self.device, self.dtype = args, sizes, device, dtype
        self.ids = ChatIds.for_vocab(sizes.vocab)
        self.peak, self.peak_source = peak_tflops(device, args.peak_tflops)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def clean(self) -> None:
        """Free what a finished (or OOM-ed) config left, and restart the peak-memory count."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def step_fn(self, model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer | None) -> Callable[[], None]:
        def step() -> None:
            with self.autocast():
                loss = model(**batch).loss
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return step

    def measure(self, model: nn.Module, name: str, batch_size: int, lora: bool) -> Result:
        """Warm up, then time `--steps` full steps (forward, backward, AdamW) between syncs; OOM is a result."""
        result = Result(name, batch_size)
        self.clean()
        try:
            self._timed(model, batch_size, result)
        except torch.cuda.OutOfMemoryError:
            result.status = "OOM"
        except RuntimeError as err:  # some kernels (flash_attn) report OOM as a plain RuntimeError
            if "out of memory" not in str(err):
                raise
            result.status = "OOM"
        # Outside the except block: the traceback that pinned the step's tensors is gone now.
        for param in model.parameters():
            param.grad = None
        self.clean()
        if result.status == "ok":
            s = self.sizes
            result.samples_per_s = batch_size / result.step_s
            result.tokens_per_s = batch_size * s.seq_len / result.step_s
            result.flops_per_step = total_flops(step_flops(s, batch_size, lora))
            if self.peak:
                result.mfu = result.flops_per_step / result.step_s / (self.peak * 1e12)
        return result

    def _timed(self, model: nn.Module, batch_size: int, result: Result) -> None:
        batch = make_batch(self.sizes, self.ids, batch_size, self.device, self.dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=self.device.type == "cuda")
        step = self.step_fn(model, batch, optimizer)
        for _ in range(self.args.warmup):
            step()
        self.sync()
        start = time.perf_counter()
        for _ in range(self.args.steps):
            step()
        self.sync()
        result.step_s = (time.perf_counter() - start) / self.args.steps
        if self.device.type == "cuda":
            result.peak_mem_bytes = torch.cuda.max_memory_allocated(self.device)

    def check_flops(self, model: nn.Module, batch_size: int, lora: bool) -> str:
        """One forward+backward under FlopCounterMode vs the formula, matmuls and attention apart."""
        self.clean()
        batch = make_batch(self.sizes, self.ids, batch_size, self.device, self.dtype)
        try:
            with FlopCounterMode(display=False) as counter:
                self.step_fn(model, batch, None)()
        except torch.cuda.OutOfMemoryError:
            return f"FLOPs check at batch {batch_size}: OOM"
        except Exception as err:  # a diagnostic: never lose the measurements to it
            return f"FLOPs check at batch {batch_size} failed: {type(err).__name__}: {err}"
        finally:
            for param in model.parameters():
                param.grad = None
        counts = counter.get_flop_counts().get("Global", {})
        att = sum(v for k, v in counts.items() if "attention" in str(k))
        mm = sum(counts.values()) - att
        parts = step_flops(self.sizes, batch_size, lora)
        f_mm = sum(v["matmul"] for v in parts.values())
        f_att = sum(v["attention"] for v in parts.values())
        line = f"FLOPs check (batch {batch_size}): matmul formula {f_mm:.4g} vs counted {mm:.4g} ({mm / f_mm:.3f}x)"
        if att:
            line += f"; attention formula {f_att:.4g} vs counted {att:.4g} ({att / f_att:.3f}x)"
        else:
            line += f"; attention formula {f_att:.4g}, not counted by torch here (CPU SDPA or flash_attn)"
        self.clean()
        return line


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module) -> Iterator[None]:
    """Checkpoint every decoder layer of the LLM (under PEFT too), then restore it exactly as it was,
    input-grad hook included, so later configs measure the model without it."""
    llm = unwrap(model)
    had_hook = hasattr(llm, "_require_grads_hook")
    enable = getattr(llm, "activation_checkpointing_enable", None) or llm.gradient_checkpointing_enable
    disable = getattr(llm, "activation_checkpointing_disable", None) or llm.gradient_checkpointing_disable
    enable()
    try:
        yield
    finally:
        disable()
        if not had_hook and hasattr(llm, "_require_grads_hook"):
            llm.disable_input_require_grads()


def sweep(bench: Bench, model: nn.Module, name: str, lora: bool, notes: list[str]) -> list[Result]:
    """Every batch size, then checkpointing on at the largest one that fit (off is the sweep's row)."""
    results = []
    for batch_size in bench.args.batch_sizes:
        result = bench.measure(model, name, batch_size, lora)
        print(f"  {name} batch {batch_size}: {result.status}", flush=True)
        results.append(result)
    fitted = [r for r in results if r.status == "ok"]
    if fitted:
        notes.append(f"{name}: {bench.check_flops(model, fitted[0].batch, lora)}")
    if not fitted or bench.args.no_checkpointing:
        return results
    off = fitted[-1]
    with activation_checkpointing(model):
        on = bench.measure(model, f"{name} +ckpt", off.batch, lora)
    print(f"  {name} +ckpt batch {off.batch}: {on.status}", flush=True)
    results.append(on)
    if on.status == "ok" and off.peak_mem_bytes and on.peak_mem_bytes:
        notes.append(
            f"{name}: activation checkpointing at batch {off.batch}: peak {gib(off.peak_mem_bytes)} off -> "
            f"{gib(on.peak_mem_bytes)} on ({on.peak_mem_bytes / off.peak_mem_bytes - 1:+.0%}), "
            f"samples/s {on.samples_per_s / off.samples_per_s - 1:+.0%}"
        )
    return results


# --- output ------------------------------------------------------------------------------------


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def table(results: list[Result]) -> str:
    rows = [("config", "batch", "samples/s", "tokens/s", "peak mem", "MFU")]
    for r in results:
        if r.status != "ok":
            rows.append((r.config, str(r.batch), r.status, "", "", ""))
            continue
        mfu = "n/a" if r.mfu is None else f"{r.mfu:.1%}"
        rows.append(
            (r.config, str(r.batch), f"{r.samples_per_s:.2f}", f"{r.tokens_per_s:,.0f}", gib(r.peak_mem_bytes), mfu)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def describe_flops(s: Sizes, lora: bool) -> str:
    parts = step_flops(s, 1, lora)
    total = total_flops(parts)
    shares = ", ".join(f"{k} {sum(v.values()) / 1e9:.3g} ({sum(v.values()) / total:.0%})" for k, v in parts.items())
    return f"GFLOPs per sample: {total / 1e9:.4g} = {shares}"


# --- main --------------------------------------------------------------------------------------


def attention_implementation(device: torch.device, dtype: torch.dtype, choice: str) -> str:
    """flash_attention_2 when asked for, or by default when the flash_attn package imports on CUDA
    (it needs half precision); SDPA otherwise."""
    if choice != "auto":
        return choice
    if device.type == "cuda" and dtype != torch.float32:
        try:
            importlib.import_module("flash_attn")
            return "flash_attention_2"
        except Exception:  # any import failure (missing, ABI mismatch) means: use SDPA
            pass
    return "sdpa"


def batch_sizes(value: str) -> list[int]:
    return [int(x) for x in value.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes on CPU (for CI)")
    parser.add_argument("--batch-sizes", type=batch_sizes, default=None, help="comma-separated (default 1,2,4,8,16)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per config (default 10, quick 2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s when not in the table")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --quick)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    parser.add_argument("--attn", choices=["auto", "sdpa", "flash_attention_2", "eager"], default="auto")
    parser.add_argument("--no-checkpointing", action="store_true", help="skip the activation checkpointing rows")
    args = parser.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 2, 4, 8, 16])
    args.steps = args.steps or (2 if args.quick else 10)
    if min(args.batch_sizes) < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("batch sizes and --steps must be positive, --warmup not negative")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda"))
    if device.type == "cpu" and not args.quick and args.device is None:
        raise SystemExit("no CUDA device: run with --quick (toy sizes), or --device cpu to insist on full size")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    elif args.quick:
        # Toy ops gain nothing from threads, and on a shared 2-core CI box OpenMP threads that wait for
        # a busy core made the quick run ~10x slower (60 s instead of 6 s).
        torch.set_num_threads(1)
    sizes = QUICK if args.quick else FULL
    attn = attention_implementation(device, dtype, args.attn)
    torch.manual_seed(0)
    bench = Bench(args, sizes, device, dtype)

    start = time.perf_counter()
    model, tower = build_model(sizes, bench.ids, device, dtype, attn)
    llm = unwrap(model)
    llm_params = sum(p.numel() for name, p in llm.named_parameters() if not name.startswith(PROJECTOR_ATTR))
    embed = llm.get_input_embeddings().weight.numel()
    projector = sum(p.numel() for p in model.parameters() if p.requires_grad)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = "n/a" if bench.peak is None else f"{bench.peak:g} TFLOP/s"
    print(f"device: {name}; {dtype}; peak {peak} [{bench.peak_source}]; built in {time.perf_counter() - start:.1f} s")
    print(
        f"LLM: Qwen3 hidden {sizes.hidden}, {sizes.layers} layers, {sizes.heads}/{sizes.kv_heads} heads"
        f" x {sizes.head_dim}, vocab {sizes.vocab}, {llm_params:,} params ({llm_params - embed:,} non-embedding,"
        f" formula's N_dec {llm_linear_params(sizes):,}), attention {llm.config._attn_implementation}"
    )
    print(
        f"tower: CLIP {sizes.image} px / patch {sizes.patch}, width {sizes.width}, {sizes.vision_layers} layers,"
        f" {sum(p.numel() for p in tower.parameters()):,} params, attention {tower.model.config._attn_implementation};"
        f" projector cross_attention {sizes.queries} queries, {sizes.projector_layers} layers,"
        f" {sizes.projector_heads} heads, {projector:,} params"
    )
    print(
        f"sample: {sizes.seq_len} tokens ({sizes.queries} image, {sizes.user_tokens + sizes.answer_tokens} text);"
        f" warmup {args.warmup}, timed {args.steps} steps; tokens/s counts every position"
    )
    print("FLOPs per step" + FORMULA.rstrip())

    notes = [f"stage1: trainable {projector:,}; {describe_flops(sizes, False)}"]
    results = sweep(bench, model, "stage1", False, notes)
    with warnings.catch_warnings():  # PEFT still asks transformers 5 the deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = vlm_peft.add_lora(model, r=sizes.lora_r)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    notes.append(f"stage2 lora: trainable {trainable:,}; {describe_flops(sizes, True)}")
    results += sweep(bench, model, "stage2 lora", True, notes)

    print()
    print(table(results))
    for note in notes:
        print(note)
    if args.out is not None:
        payload = {
            "device": name,
            "dtype": str(dtype).removeprefix("torch."),
            "attention": attn,
            "peak_tflops": bench.peak,
            "peak_source": bench.peak_source,
            "sizes": dataclasses.asdict(sizes) | {"seq_len": sizes.seq_len, "patches": sizes.patches},
            "warmup": args.warmup,
            "steps": args.steps,
            "flops_formula": "FLOPs per step" + FORMULA.rstrip(),
            "notes": notes,
            "results": [dataclasses.asdict(r) for r in results],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
