"""`vlm-peft` under torchrun for the distributed tests. VLM_PEFT_TEST_SLOW_SAVE=S makes rank 0's adapter
saves S seconds late, so that a process that does not wait for them fails; VLM_PEFT_TEST_DIE_AT=STAGE:N
kills rank 0 right after it wrote stage STAGE's checkpoint at step N (torchrun then stops the others);
VLM_PEFT_TEST_SLOW_EVAL=S makes the main process's evaluation S seconds longer."""

import os
import sys
import time

from vlm_peft.cli import main
from vlm_peft.training import trainer as trainer_module

if os.environ.get("VLM_PEFT_TEST_SLOW_SAVE") and os.environ.get("RANK") == "0":
    original = trainer_module.save_adapter

    def late_save(*args, **kwargs):
        time.sleep(float(os.environ["VLM_PEFT_TEST_SLOW_SAVE"]))
        return original(*args, **kwargs)

    trainer_module.save_adapter = late_save

if os.environ.get("VLM_PEFT_TEST_SLOW_EVAL"):
    from vlm_peft.training import stages

    evaluate_and_record = stages._evaluate_and_record

    def late_evaluation(*args, **kwargs):
        time.sleep(float(os.environ["VLM_PEFT_TEST_SLOW_EVAL"]))
        return evaluate_and_record(*args, **kwargs)

    stages._evaluate_and_record = late_evaluation

if os.environ.get("VLM_PEFT_TEST_DIE_AT"):
    from vlm_peft.training import stages

    stage, step = os.environ["VLM_PEFT_TEST_DIE_AT"].split(":")

    class DiesAfterSave(stages.FiniteGuard):
        def on_save(self, args, state, control, **kwargs):
            if self.stage == stage and state.global_step == int(step) and os.environ.get("RANK") == "0":
                os._exit(3)

    stages.FiniteGuard = DiesAfterSave

sys.exit(main(sys.argv[1:]))
