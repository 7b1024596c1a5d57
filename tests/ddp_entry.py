"""`vlm-peft` under torchrun for the distributed tests, with hooks set by environment variables:

VLM_PEFT_TEST_SLOW_SAVE=S   rank 0's adapter saves start S seconds late, so that a process that does
                            not wait for them fails;
VLM_PEFT_TEST_DIE_AT=ST:N   rank 0 dies right after writing stage ST's checkpoint at step N (torchrun
                            then stops the others);
VLM_PEFT_TEST_DUMP=DIR      at the end of each stage's training, every process gathers the adapter's
                            weights from the model in memory (sharded or not) and rank 0 writes them
                            to DIR/STAGE.safetensors, to compare with what the adapter dir reloads;
VLM_PEFT_TEST_NO_SHM=1      DeepSpeed's CPU ranks all-reduce over gloo instead of the shared-memory op
                            DeepSpeed compiles at its first start (~40 s on a fresh machine).
"""

import os
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from vlm_peft.cli import main
from vlm_peft.model.checkpoint import adapter_key
from vlm_peft.model.engines import whole_state
from vlm_peft.training import stages
from vlm_peft.training import trainer as trainer_module

if os.environ.get("VLM_PEFT_TEST_NO_SHM"):
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # read where DeepSpeed would build it

if os.environ.get("VLM_PEFT_TEST_SLOW_SAVE") and os.environ.get("RANK") == "0":
    original, seconds = trainer_module.save_adapter, float(os.environ["VLM_PEFT_TEST_SLOW_SAVE"])

    def late_save(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    trainer_module.save_adapter = late_save


class TestHooks(stages.FiniteGuard):
    def on_save(self, args, state, control, **kwargs):
        die_at = os.environ.get("VLM_PEFT_TEST_DIE_AT")
        if die_at == f"{self.stage}:{state.global_step}" and os.environ.get("RANK") == "0":
            os._exit(3)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if os.environ.get("VLM_PEFT_TEST_DUMP"):
            weights = whole_state(model, adapter_key)  # every process: a collective when sharded
            if os.environ.get("RANK") == "0":
                out = Path(os.environ["VLM_PEFT_TEST_DUMP"])
                out.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"{self.stage}.safetensors"))


stages.FiniteGuard = TestHooks

sys.exit(main(sys.argv[1:]))
