"""Several processes (torchrun / accelerate launch): one setting for the whole run, one writer per file.

The processes are started by the launcher; vlm-peft only joins them (accelerate's PartialState, gloo
on CPU machines) and keeps its own bookkeeping consistent: files shared by all ranks are written by
the main process while the others wait at a barrier. Parallelism itself is transformers' / accelerate's.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from . import strategies
from .recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)


# Read at import, before any accelerator of this process sets them itself (accelerate does, for good).
LAUNCHER_FLAGS = {flag: os.environ.get(flag, "false").lower() == "true" for flag in (
    "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")}  # fmt: skip


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(recipe: Recipe) -> None:
    """Join the launcher's process group before anything is built; refuse a recipe that says otherwise."""
    strategy = recipe.distributed.strategy
    if world_size() == 1:
        if strategy in ("fsdp", "deepspeed"):
            logger.warning(
                "distributed.strategy: %s, but this is one process: it trains unsharded. Launch several with "
                "--nproc N, torchrun or accelerate launch.", strategy,
            )  # fmt: skip
        return
    if strategy == "none":
        raise RecipeError(
            f"distributed.strategy: 'none', but the run was launched with {world_size()} processes; set it to ddp, "
            "fsdp or deepspeed (or launch one process)."
        )
    if strategy == "deepspeed":
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        # DeepSpeed calls collectives by names torch has deprecated; torch warns at every call (tens of
        # thousands of lines in a demo run), about nothing a user can change.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise RecipeError(
                f"distributed.strategy: deepspeed, but DeepSpeed does not import ({err}); "
                "pip install 'vlm-peft[deepspeed]'."
            ) from None
    for flag, name in (("ACCELERATE_USE_FSDP", "fsdp"), ("ACCELERATE_USE_DEEPSPEED", "deepspeed")):
        if strategy != name and LAUNCHER_FLAGS[flag]:
            raise RecipeError(
                f"distributed.strategy: {strategy}, but the launcher set {flag} (an accelerate config with {name}); "
                f"set distributed.strategy: {name} in the recipe (its settings live there), or launch with a plain "
                "multi-process config or torchrun."
            )
    state = join(recipe)
    if state.num_processes != world_size():
        raise RecipeError(
            f"WORLD_SIZE is {world_size()} but {state.num_processes} process(es) joined (LOCAL_RANK / RANK / "
            "MASTER_ADDR missing?); start the processes with torchrun, accelerate launch or vlm-peft train --nproc."
        )


def begin_stage(recipe: Recipe) -> None:
    """Before a stage's trainer arguments are built: a fresh accelerate state, as the stage's trainer makes
    its own accelerator (DeepSpeed refuses a second one on the state of the first)."""
    if world_size() > 1:
        join(recipe)


def join(recipe: Recipe) -> Any:
    """A fresh accelerate state over the launcher's processes (the process group itself stays): its state
    is a process singleton."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    timeout = datetime.timedelta(seconds=recipe.distributed.timeout)
    if recipe.distributed.strategy == "deepspeed":
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        # Without CUDA accelerate would find no backend for DeepSpeed and fall back to one process.
        return PartialState(timeout=timeout, **({} if torch.cuda.is_available() else {"backend": "gloo"}))
    # On a machine without CUDA the processes talk over gloo (transformers needs use_cpu for that).
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timeout)


def check_args(args: dict[str, Any]) -> dict[str, Any]:
    """`args` for an SFTConfig built only to check a stage's arguments: it leaves the processes'
    accelerate state as it is (building one resets it otherwise)."""
    return _configured_state(args) if world_size() > 1 else args


def _configured_state(args: dict[str, Any]) -> dict[str, Any]:
    return {**args, "accelerator_config": {**(args.get("accelerator_config") or {}), "use_configured_state": True}}


def trainer_args(recipe: Recipe, args: dict[str, Any]) -> dict[str, Any]:
    """The stage's SFTConfig arguments `args` with what `distributed:` adds; called as the stage starts,
    after `begin_stage` (a ZeRO-3 config then changes how the stage's LLM loads: partitioned)."""
    if world_size() == 1:
        return args
    d = recipe.distributed
    args = {**args, "ddp_timeout": d.timeout}
    cpu = not torch.cuda.is_available()
    if d.strategy == "deepspeed":
        args["deepspeed"] = strategies.deepspeed_config(d)
        if cpu:  # transformers' own state for DeepSpeed finds no backend on CPU: keep the one joined over gloo
            args = _configured_state(args)
        return args
    if cpu:
        args["use_cpu"] = True
    if d.strategy == "fsdp":
        options = strategies.fsdp_options(d)
        # FSDP's own activation checkpointing, per sharded layer: transformers' would gather every layer twice.
        options.setdefault("activation_checkpointing", bool(args.get("activation_checkpointing")))
        args.update(fsdp="full_shard", fsdp_config={"version": 2, **options}, activation_checkpointing=False)
    return args


@contextlib.contextmanager
def whole_models() -> Iterator[None]:
    """Models loaded or built inside are whole on every process, not partitioned by DeepSpeed ZeRO-3's
    `zero.Init` (which transformers applies to every model while a ZeRO-3 config is alive): the vision
    tower runs outside the engine, which would never gather it, and a random base is saved whole.
    transformers keeps that config in a module global and has no public switch for it."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def is_main() -> bool:
    if world_size() == 1:
        return True
    from accelerate import PartialState

    return PartialState().is_main_process


def barrier() -> None:
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def process() -> tuple[int, int]:
    """(rank, world size) of this process."""
    if world_size() == 1:
        return 0, 1
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes


def launch(nproc: int, argv: list[str]) -> int:
    """`vlm-peft train … --nproc N`: rerun the same command under torchrun with N processes on this node."""
    if world_size() > 1:
        raise RecipeError("--nproc is for starting a run; this process is already one of several.")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise RecipeError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} GPU(s); one process per GPU.")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "vlm_peft.cli", *argv]  # fmt: skip
    logger.info("launching: %s", " ".join(command))
    return subprocess.call(command)


def global_batch(args: Any) -> str:
    world = max(world_size(), 1)
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    total = per_device * world * accumulation
    return f"{total} ({per_device} per device x {world} processes x {accumulation} accumulation)"
