"""`vlm-peft` under torchrun for the distributed tests. VLM_PEFT_TEST_SLOW_SAVE=S makes rank 0's adapter
saves S seconds late, so that a process that does not wait for them fails; VLM_PEFT_TEST_DIE_AT=STAGE:N
kills rank 0 right after it wrote stage STAGE's checkpoint at step N (torchrun then stops the others);
VLM_PEFT_TEST_SLOW_EVAL=S makes the main process's evaluation S seconds longer."""

import os
import sys
import time

from vlm_peft.cli import main
from vlm_peft.training import stages
from vlm_peft.training import trainer as trainer_module


def late(module, name: str, variable: str) -> None:
    """Make `module.name` start `$variable` seconds late."""
    original, seconds = getattr(module, name), float(os.environ[variable])

    def delayed(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    setattr(module, name, delayed)


if os.environ.get("VLM_PEFT_TEST_SLOW_SAVE") and os.environ.get("RANK") == "0":
    late(trainer_module, "save_adapter", "VLM_PEFT_TEST_SLOW_SAVE")
if os.environ.get("VLM_PEFT_TEST_SLOW_EVAL"):
    late(stages, "_evaluate_and_record", "VLM_PEFT_TEST_SLOW_EVAL")

if os.environ.get("VLM_PEFT_TEST_DIE_AT"):
    stage, step = os.environ["VLM_PEFT_TEST_DIE_AT"].split(":")

    class DiesAfterSave(stages.FiniteGuard):
        def on_save(self, args, state, control, **kwargs):
            if self.stage == stage and state.global_step == int(step) and os.environ.get("RANK") == "0":
                os._exit(3)

    stages.FiniteGuard = DiesAfterSave

sys.exit(main(sys.argv[1:]))
