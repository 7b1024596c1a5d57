"""`merge`: fold LoRA into the base and write a self-contained merged dir.

The Qwen3 part is written by `save_pretrained` without the projector's keys, so plain
`AutoModelForCausalLM.from_pretrained(dir)` loads it as a text model with nothing unexpected;
the projector, the VLM config, the vision tower (copied, or referenced) and the processor sit
beside it. The dir is built under a temporary name (`.OUT.partial-PID`) and put in place at the
end: a merge that fails or is killed never leaves a complete-looking dir, and with `overwrite` the
old and new dirs are exchanged in one atomic rename, so OUT always names a complete model. Temporary
dirs of a merge that died are cleaned up (an old model put aside is put back) by the next merge.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftModel
from safetensors.torch import save_file

from ..atomic import exchange, remove, stale_temporaries
from ..model.checkpoint import PROJECTOR_FILE, VISION_DIR, active_projector, sha256, unwrap
from ..model.config import VLMConfig
from ..model.hooks import PROJECTOR_ATTR, get_state
from .loading import load

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _card(cfg: VLMConfig, adapter_dir: Path, recipe: dict[str, Any] | None, dtype: torch.dtype) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [vlm-peft, vision-language, qwen3]",
        "---",
        "",
        f"# {Path(adapter_dir).name} (merged)",
        "",
        f"A vision-language model made with vlm-peft: the causal LM `{cfg.base_model}` with its LoRA adapter",
        f"folded in ({dtype}), a frozen vision tower (`{cfg.vision_model}`), and a `{cfg.projector}` projector",
        f"that turns each image into {cfg.num_image_tokens} tokens, spliced in by forward hooks.",
        "",
        "## Load",
        "",
        "```python",
        "import vlm_peft",
        "model, processor = vlm_peft.load('PATH_TO_THIS_DIR')",
        "```",
        "",
        "As a text-only model: `transformers.AutoModelForCausalLM.from_pretrained('PATH_TO_THIS_DIR')`.",
        "",
        "Chat: `vlm-peft chat PATH_TO_THIS_DIR --image cat.jpg --prompt 'What is this?'`",
    ]
    if recipe:
        lines += ["", "## Training", ""]
        for stage in recipe.get("stages", []):
            data = stage.get("data", {})
            lines.append(
                f"- stage `{stage['name']}`: trains {', '.join(stage.get('train', []))} on `{data.get('train')}`; "
                f"lr {stage.get('lr')}; args {stage.get('args')}"
            )
        lines += ["", "Full recipe: `recipe.yaml`."]
    return "\n".join(lines) + "\n"


def _recover(out: Path) -> None:
    """Clean up after merges into `out` that died: put an old model put aside back when `out` is
    missing, remove half-written and leftover temporary dirs."""
    for path, match in stale_temporaries(out.parent, rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)"):
        if match.group(1) == "old" and not out.exists():
            path.rename(out)
            logger.warning("%s was missing after a merge that died; restored it from %s", out, path.name)
        else:
            remove(path)
            logger.warning("removed %s, left by a merge into %s that died", path.name, out)


def _refuse_overlap(out: Path, sources: dict[str, Path]) -> None:
    target = out.resolve()
    for what, source in sources.items():
        source = source.resolve()
        if target == source or target in source.parents or source in target.parents:
            raise ValueError(
                f"{out}: the output dir cannot be, contain or lie inside the {what} it is made from ({source}); "
                "write it somewhere else."
            )


def prepare_output(source_dir: Path, out: Path, base: str | None, overwrite: bool) -> None:
    """Before anything is loaded: refuse an output over its own sources or over a non-empty dir (unless
    `overwrite`), and clean up after earlier writes into `out` that died."""
    sources = {"adapter dir": source_dir}
    if (source_dir / "vlm_config.json").is_file():
        named = VLMConfig.from_pretrained(source_dir)
        for what, name in (("base model", base or named.base_model), ("vision tower", named.vision_model)):
            if name and not name.startswith("./") and Path(name).exists():  # ./x lies in the adapter dir
                sources[what] = Path(name)
    _refuse_overlap(out, sources)
    _recover(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")


def load_merged(
    source_dir: str | Path, base: str | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.nn.Module, Any]:
    """(LLM with LoRA folded in and vision attached, processor) from an adapter or merged dir."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}.")
        dtype = DTYPES[dtype]
    model, processor = load(source_dir, base=base, dtype=dtype or "auto")
    llm = unwrap(model)
    if isinstance(model, PeftModel):
        model.merge_and_unload()  # folds LoRA in place; the projector wrapper becomes the trained copy
    return llm, processor


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """A temporary dir beside `out` to write into, put in place of `out` when the block ends without error
    (with `out` replaced in one atomic exchange where the system allows) and removed when it fails."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if not out.exists():
            tmp.rename(out)
        elif exchange(tmp, out):
            remove(tmp)  # the old model (or a link OUT was), now under the temporary name
        else:  # two renames; a write dying between them is repaired by the next one (_recover)
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def merge(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "2GB",
    copy_vision: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `out_dir`: the base with LoRA merged (safetensors, sharded past `max_shard_size`),
    plus `vlm_config.json`, the projector, the vision tower (or a reference to it with
    `copy_vision=False`), the processor and a model card."""
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    prepare_output(adapter_dir, out, base, overwrite)
    llm, processor = load_merged(adapter_dir, base, dtype)
    projector = active_projector(llm)
    state = get_state(llm)
    cfg = state.config
    if not copy_vision and (state.vision.source is None or cfg.vision_model.startswith("./")):
        raise ValueError("the vision tower has no source to reference (random or stored in the adapter); copy it.")

    with building(out) as tmp:
        text_state = {k: v for k, v in llm.state_dict().items() if not k.startswith(f"{PROJECTOR_ATTR}.")}
        llm.save_pretrained(tmp, state_dict=text_state, max_shard_size=max_shard_size)
        weights = {k: v.detach().contiguous().cpu() for k, v in projector.state_dict().items()}
        save_file(weights, str(tmp / PROJECTOR_FILE), metadata={"format": "pt"})
        if copy_vision:
            state.vision.model.save_pretrained(tmp / VISION_DIR)
            cfg = dataclasses.replace(cfg, vision_model=f"./{VISION_DIR}", vision_config=None)
        elif not Path(cfg.vision_model).is_absolute() and Path(cfg.vision_model).exists():
            cfg = dataclasses.replace(cfg, vision_model=str(Path(cfg.vision_model).resolve()))
        cfg = dataclasses.replace(cfg, checksums={PROJECTOR_FILE: sha256(tmp / PROJECTOR_FILE)})
        cfg.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        recipe = None
        if (adapter_dir / "recipe.yaml").is_file():
            shutil.copy(adapter_dir / "recipe.yaml", tmp / "recipe.yaml")
            recipe = yaml.safe_load((adapter_dir / "recipe.yaml").read_text())
        (tmp / "README.md").write_text(_card(cfg, adapter_dir, recipe, next(llm.parameters()).dtype))
    logger.info("merged %s into %s", adapter_dir, out)
    return out
