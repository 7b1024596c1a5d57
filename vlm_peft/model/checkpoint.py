"""Adapter dirs: what a stage writes and what `attach(llm, dir)` reads back.

Layout: `vlm_config.json` (with the base's fingerprint), `projector.safetensors`, PEFT's
`adapter_config.json` + `adapter_model.safetensors` when LoRA is present, processor files,
and `vision/` when the tower has random weights and so no source to reload it from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

from .config import CONFIG_NAME, VLMConfig
from .engines import refuse_sharded, unwrapped_tree
from .hooks import PROJECTOR_ATTR, get_state

PROJECTOR_FILE = "projector.safetensors"
LORA_FILE, LORA_CONFIG = "adapter_model.safetensors", "adapter_config.json"
VISION_DIR = "vision"
FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "vocab_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "tie_word_embeddings",
)


def fingerprint(config: PretrainedConfig) -> dict[str, Any]:
    """The parts of a base config an adapter depends on (config only: weights are not hashed)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {key: getattr(text, key, None) for key in FINGERPRINT_KEYS}


def check_base(cfg: VLMConfig, llm_config: PretrainedConfig, source: str) -> None:
    if not cfg.base_fingerprint:
        return
    have = fingerprint(llm_config)
    diffs = [
        f"{key}: adapter {cfg.base_fingerprint.get(key)!r} vs model {have[key]!r}"
        for key in FINGERPRINT_KEYS
        if key in cfg.base_fingerprint and cfg.base_fingerprint[key] != have[key]
    ]
    if diffs:
        raise ValueError(
            f"{source} was trained on base {cfg.base_model!r}, which differs from the model given "
            f"({getattr(llm_config, '_name_or_path', '') or 'unnamed'}): "
            + "; ".join(diffs)
            + ". Attach it to the base it names."
        )


def param_role(name: str) -> str:
    """What a parameter of an attached model is, by its name: "lora", "projector" (the one that trains and
    is saved), "projector_copy" (PEFT's frozen `original_module` beside it) or "llm"."""
    if "lora_" in name:
        return "lora"
    if PROJECTOR_ATTR in name:
        return "projector_copy" if "original_module" in name else "projector"
    return "llm"


def adapter_key(name: str) -> bool:
    """A state-dict entry that an adapter dir holds."""
    return param_role(name) in ("lora", "projector")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def active_projector(llm: nn.Module) -> nn.Module:
    """The projector the hook calls: PEFT's trainable copy when `modules_to_save` wrapped it."""
    module = getattr(llm, PROJECTOR_ATTR)
    if hasattr(module, "modules_to_save"):
        name = module.active_adapter
        name = name[0] if isinstance(name, (list, tuple)) else name
        return module.modules_to_save[name]
    return module


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or an error naming it (a truncated file otherwise fails deep in safetensors)."""
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError and OSError say nothing of the file
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); it is damaged: re-save or retrain."
        ) from None


def verify_dir(directory: Path, cfg: VLMConfig) -> None:
    """What an adapter or merged dir must hold before anything is read from it: the files the
    config's checksums name, unchanged, and PEFT's two LoRA files together or not at all."""
    for name, digest in cfg.checksums.items():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {directory} was saved with it ({CONFIG_NAME} lists it).")
        if sha256(path) != digest:
            raise ValueError(
                f"{path} changed since it was saved (its SHA-256 differs from the one in {CONFIG_NAME}): the file is "
                "damaged or was edited; re-save or retrain it."
            )
    has_config, has_weights = (directory / LORA_CONFIG).is_file(), (directory / LORA_FILE).is_file()
    if has_config:
        try:
            json.loads((directory / LORA_CONFIG).read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{directory / LORA_CONFIG} is not valid JSON ({err}): it is damaged; re-save it."
            ) from None
    if has_config != has_weights:
        missing, present = (LORA_FILE, LORA_CONFIG) if has_config else (LORA_CONFIG, LORA_FILE)
        raise FileNotFoundError(
            f"{directory / missing} is missing beside {present}: the LoRA adapter is incomplete, and loading it "
            "without LoRA would silently give another model."
        )


def load_projector(projector: nn.Module, path: Path) -> None:
    """Strict load: a key mismatch would otherwise leave a randomly initialised projector."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the adapter dir has no projector weights.")
    state = read_tensors(path)
    expected = projector.state_dict(keep_vars=True)
    refuse_sharded(expected, f"loading {path}", "load the weights before the model is sharded.")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong]
        # Revision 2 changed layout once before any release (no patch_embed / merge_proj before it).
        early = (
            " It is a revision-2 projector from before 2026-12-02's per-patch layout: retrain it, or load "
            "it with vlm-peft at commit 9ae248f."
            if "patch_embed" in missing
            else ""
        )
        raise ValueError(
            f"{path} does not match the projector built from vlm_config.json: missing keys {missing}, "
            f"unexpected keys {unexpected}, shape mismatches {shapes}.{early}"
        )
    projector.load_state_dict(state, strict=True)


def save_adapter(
    model: nn.Module, directory: str | Path, processor: Any = None, weights: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write an adapter dir for an attached model (bare or PEFT-wrapped).

    `weights`: the adapter's tensors whole, by state-dict name, for a model sharded across processes
    (FSDP, ZeRO-3): `vlm_peft.model.engines.whole_state(model, adapter_key)` on every process, then
    save on one. By default they are read from the model, which must hold them whole.
    """
    if weights is None:
        weights = {k: v for k, v in model.state_dict(keep_vars=True).items() if adapter_key(k)}
        refuse_sharded(
            weights,
            "save_adapter",
            "gather them on every process with vlm_peft.model.engines.whole_state(model, adapter_key) and pass "
            "them as `weights=`.",
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    llm = unwrap(model)
    state = get_state(llm)
    cfg = dataclasses.replace(
        state.config,
        base_model=getattr(llm.config, "_name_or_path", None) or None,
        base_fingerprint=fingerprint(llm.config),
    )
    if state.vision.source is None:
        state.vision.model.save_pretrained(out / VISION_DIR)
        cfg = dataclasses.replace(cfg, vision_model=f"./{VISION_DIR}", vision_config=None)
    if isinstance(model, PeftModel):
        if not hasattr(getattr(llm, PROJECTOR_ATTR), "modules_to_save"):
            raise ValueError(
                f"the PEFT model does not list {PROJECTOR_ATTR!r} in modules_to_save, so the projector is frozen "
                "and would not be saved with the adapter; wrap with vlm_peft.add_lora(model, ...)."
            )
        with unwrapped_tree(model):
            model.save_pretrained(out, state_dict={k: v.detach() for k, v in weights.items()})
    prefix = module_name(model, active_projector(llm)) + "."
    projector = {k[len(prefix) :]: v.detach().contiguous().cpu() for k, v in weights.items() if k.startswith(prefix)}
    save_file(projector, str(out / PROJECTOR_FILE), metadata={"format": "pt"})
    written = [PROJECTOR_FILE, *([LORA_FILE, LORA_CONFIG] if isinstance(model, PeftModel) else [])]
    if state.vision.source is None:  # a random tower, saved here
        written += [f"{VISION_DIR}/{p.name}" for p in sorted((out / VISION_DIR).glob("*.safetensors"))]
    cfg = dataclasses.replace(cfg, checksums={name: sha256(out / name) for name in written})
    cfg.save_pretrained(out)  # last: its checksums vouch for the files written before it
    if processor is not None:
        processor.save_pretrained(out)
    return out


def module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def projector_matches_file(projector: nn.Module, path: Path) -> bool:
    saved = read_tensors(path)
    current = projector.state_dict()
    return all(torch.equal(saved[k], current[k].detach().cpu().to(saved[k].dtype)) for k in saved)


def load_training_weights(model: nn.Module, directory: str | Path) -> None:
    """Restore projector (and LoRA) weights from a checkpoint dir into a model of the same shape."""
    from peft import set_peft_model_state_dict

    directory = Path(directory)
    verify_dir(directory, VLMConfig.from_pretrained(directory))
    llm = unwrap(model)
    load_projector(active_projector(llm), directory / PROJECTOR_FILE)
    if isinstance(model, PeftModel):
        path = directory / LORA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the checkpoint has no LoRA weights but the model has LoRA.")
        result = set_peft_model_state_dict(model, read_tensors(path))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{path} does not match the model's adapters: missing {missing[:5]}, unexpected "
                f"{list(result.unexpected_keys)[:5]}."
            )
