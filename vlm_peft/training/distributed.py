"""Several processes (torchrun / accelerate launch): one setting for the whole run, one writer per file.

The processes are started by the launcher; vlm-peft only joins them (accelerate's PartialState, gloo
on CPU machines) and keeps its own bookkeeping consistent: files shared by all ranks are written by
the main process while the others wait at a barrier. Parallelism itself is transformers' / accelerate's.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(recipe: Recipe) -> None:
    """Join the launcher's process group before anything is built; refuse a recipe that says otherwise."""
    strategy = recipe.distributed.strategy
    if world_size() == 1:
        return
    if strategy == "none":
        raise RecipeError(
            f"distributed.strategy: 'none', but the run was launched with {world_size()} processes; set it to ddp "
            "(or launch one process)."
        )
    if strategy != "ddp":
        raise RecipeError(f"distributed.strategy: {strategy!r} is not supported yet; use ddp.")
    for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        if os.environ.get(flag, "false").lower() == "true":
            raise RecipeError(
                f"distributed.strategy: ddp, but the launcher set {flag} (an accelerate config with FSDP/DeepSpeed); "
                "launch with a plain multi-process config, or torchrun."
            )
    from accelerate import PartialState

    # On a machine without CUDA the processes talk over gloo (transformers needs use_cpu for that).
    state = PartialState(
        cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(seconds=recipe.distributed.timeout)
    )
    if state.num_processes != world_size():
        raise RecipeError(
            f"WORLD_SIZE is {world_size()} but {state.num_processes} process(es) joined (LOCAL_RANK / RANK / "
            "MASTER_ADDR missing?); start the processes with torchrun, accelerate launch or vlm-peft train --nproc."
        )


def trainer_args(recipe: Recipe) -> dict[str, Any]:
    """SFTConfig arguments every stage gets from `distributed:`."""
    if world_size() == 1:
        return {}
    args: dict[str, Any] = {"ddp_timeout": recipe.distributed.timeout}
    if not torch.cuda.is_available():
        args["use_cpu"] = True
    return args


def is_main() -> bool:
    if world_size() == 1:
        return True
    from accelerate import PartialState

    return PartialState().is_main_process


def barrier() -> None:
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def wait_for_file(path: Path, poll: float = 1.0) -> None:
    """Wait, holding no collective, until the main process writes `path`: for work it does alone that may
    outlast distributed.timeout (evaluation). If the main process dies, the launcher stops this one."""
    while not path.exists():
        time.sleep(poll)


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
