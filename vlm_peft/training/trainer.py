"""`VLMTrainer`: TRL's SFTTrainer with separate projector / LoRA learning rates and adapter-dir checkpoints."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_optimizer import is_optimizer_factory
from trl import SFTTrainer

from ..model.checkpoint import adapter_key, load_training_weights, param_role, save_adapter
from ..model.cross_attention import CrossAttentionProjector
from ..model.engines import canonical, numel, whole_state
from .answer_logits import answer_positions_only

# Key in a checkpoint's trainer_state.json `stateful_callbacks`: the sum of the per-step losses so far.
LOSS_KEY = "VLMStageLoss"


class NonFiniteError(ValueError):
    """Training went to NaN or infinity; the step it happened at is named."""


class FiniteGuard(TrainerCallback):
    """Stops a run whose gradients or loss stop being finite, before the optimizer applies them, so
    that the last checkpoint stays the last good state (a run that went NaN used to finish "done")."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def _fail(self, state: Any, what: str, applied: bool = False) -> None:
        done = "" if applied else " Nothing of this step was applied;"
        raise NonFiniteError(
            f"stage {self.stage}, step {state.global_step + 1}: {what}.{done} The last checkpoint of the stage is "
            "its last good state (a rerun resumes from it). Lower the learning rate, raise warmup, or look for a "
            "bad row in the step's batch."
        )

    def check_loss(self, state: Any, loss: torch.Tensor) -> None:
        """Before backward: DeepSpeed steps its optimizer inside backward, before on_pre_optimizer_step."""
        if not torch.isfinite(loss.detach()).all():
            self._fail(state, f"the loss is {loss.detach().float().sum().item()}")

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if args.fp16 or model is None:  # fp16's grad scaler skips inf steps itself
            return
        grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        if grads and not torch.stack([torch.isfinite(g).all() for _, g in grads]).all():
            name = next(n for n, g in grads if not torch.isfinite(g).all())
            self._fail(state, f"non-finite gradient (first in {name})")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value) and not (args.fp16 and key == "grad_norm"):
                # Logged after the step: under DeepSpeed (which clips and steps inside backward) it was applied.
                self._fail(state, f"the logged {key} is {value}", applied=bool(args.deepspeed))


def trainable_sizes(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameter count by role (whole sizes, also when sharded)."""
    sizes = {"projector": 0, "lora": 0}
    for name, param in model.named_parameters():
        role = param_role(canonical(name))
        if param.requires_grad and role in sizes:
            sizes[role] += numel(param)
    return sizes


class VLMTrainer(SFTTrainer):
    """Checkpoints are adapter dirs (projector + LoRA in safetensors, no LLM copy), so resuming
    restores exactly what trains; the optimizer has one learning rate for the projector, one for the
    cross-attention blocks inside a revision-2 projector, and one for LoRA (a tiny projector needs
    ~10x the LoRA rate to learn without collapse; its attention blocks, ~1/10 of the projector's)."""

    def __init__(self, *args: Any, projector_lr: float, attention_lr: float, lora_lr: float, **kwargs: Any) -> None:
        self.projector_lr = projector_lr
        self.attention_lr = attention_lr
        self.lora_lr = lora_lr
        # (loss sum, steps) of the steps trained before this run resumed, for the stage's mean loss.
        self.loss_before: tuple[float, int] = (0.0, 0)
        super().__init__(*args, **kwargs)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp and self.args.fsdp_plugin_args and not self.is_fsdp_enabled:
            # accelerate turns its FSDP plugin on for accelerators only; FSDP2 itself runs on CPU over gloo,
            # and this is how the very path that shards on GPUs runs (and is tested) on a machine without one.
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # transformers' train loss after a resume covers the resumed steps only; the running sum is kept
        # in the checkpoint so the stage's mean covers all of them.
        total = self.loss_before[0] + self._total_loss_scalar + float(self._tr_loss.item())
        self.state.stateful_callbacks[LOSS_KEY] = {
            "loss_sum": total,
            "steps": self.state.global_step,
            # What trains, so that a resume with another `train` list is named as such (under DeepSpeed or
            # FSDP the optimizer state would otherwise fail to load deep inside the engine).
            "trainable": trainable_sizes(self.model),
        }
        super()._save_checkpoint(model, trial)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        # Groups by role, always in this order, so a checkpoint's optimizer state lines up on resume
        # whatever the rates are; the projector comes first so that logs show its learning rate.
        # (Revision-1 projectors have no "attention" group, so their checkpoints resume as before.)
        roles = {
            "projector": self.projector_lr,
            "attention": self.attention_lr,
            "lora": self.lora_lr,
            "other": self.args.learning_rate,
        }
        # key_proj feeds only the attention but stays at the projector's rate: measured so (BENCHMARKS §9).
        projectors = [m for m in model.modules() if isinstance(m, CrossAttentionProjector)]
        blocks = {id(p) for m in projectors for p in m.layers.parameters()}
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {(r, d): [] for r in roles for d in (True, False)}
        for name, param in model.named_parameters():
            if param.requires_grad:
                role = param_role(name)
                role = "attention" if role == "projector" and id(param) in blocks else role
                role = role if role in roles else "other"
                groups[(role, name in decay)].append(param)
        if not any(groups.values()):
            raise ValueError("nothing to train: no parameter requires grad (check the stage's `train` list).")
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        if is_optimizer_factory(optimizer_cls) or "params" in kwargs or "model" in kwargs:
            raise ValueError(
                f"optim={self.args.optim!r} builds its own parameter groups, which the separate projector and LoRA "
                "learning rates need; use an AdamW/SGD-style optimizer."
            )
        kwargs.pop("lr", None)
        param_groups = [
            {"params": params, "lr": roles[role], "weight_decay": self.args.weight_decay if decayed else 0.0}
            for (role, decayed), params in groups.items()
            if params
        ]
        self.optimizer = optimizer_cls(param_groups, **kwargs)
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """An adapter dir: projector + LoRA only, gathered whole from every process when sharded (so every
        process calls this); never the frozen LLM, which transformers would gather whole under ZeRO-3."""
        weights = whole_state(self.model, adapter_key)
        if self.args.should_save:
            save_adapter(self.model, output_dir or self.args.output_dir, self.processing_class, weights=weights)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            return super()._save_optimizer_and_scheduler(output_dir)
        # The engines' own checkpoints would hold the whole frozen LLM beside the optimizer: only what
        # trains is kept (its weights are the adapter files beside).
        scheduler_saved = False
        if self.is_deepspeed_enabled:
            from accelerate.utils import DeepSpeedSchedulerWrapper

            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            scheduler_saved = isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper)
        else:
            from accelerate.utils import save_fsdp_optimizer

            plugin = self.accelerator.state.fsdp_plugin
            save_fsdp_optimizer(plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save and not scheduler_saved:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None):
        if resume_from_checkpoint is None or not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        # The adapter weights go in before the engine shards the model; the engine's checkpoint then
        # restores the optimizer (and, for DeepSpeed, the same trained weights: it holds no frozen ones).
        load_training_weights(self.model, resume_from_checkpoint)
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        if self.is_deepspeed_enabled:
            path, _ = self.model_wrapped.load_checkpoint(
                resume_from_checkpoint, load_module_strict=False, load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )  # fmt: skip
            if path is None:
                raise ValueError(f"{resume_from_checkpoint}: no DeepSpeed checkpoint (global_step*/) to resume from.")
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        with answer_positions_only():
            result = super().compute_loss(model, inputs, *args, **kwargs)
        if self.is_deepspeed_enabled and model.training:
            guard = next((c for c in self.callback_handler.callbacks if isinstance(c, FiniteGuard)), None)
            if guard is not None:
                guard.check_loss(self.state, result[0] if isinstance(result, tuple) else result)
        return result

    def model_for_evaluation(self) -> torch.nn.Module:
        """The model every process evaluates: as training left it (sharded, on its device). A stage that
        resumed at its end ran no step here, so its model is prepared as training would have: a ZeRO-3 LLM
        partitioned with no engine to gather it gets an inference engine (as in transformers' own
        evaluation), an FSDP model is sharded, any other model goes to the process's device."""
        if self.accelerator._models:
            return self.model
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_deepspeed_enabled and plugin.zero_stage == 3:
            from transformers.integrations.deepspeed import deepspeed_init

            deepspeed_init(self, num_training_steps=0, inference=True)
            self.model_wrapped = self.deepspeed = self.accelerator.prepare(self.model)
        elif self.is_fsdp_enabled:
            from accelerate.utils import fsdp2_prepare_model
            from torch.distributed.fsdp import register_fsdp_forward_method

            self.model = self.model_wrapped = fsdp2_prepare_model(self.accelerator, self.model)
            register_fsdp_forward_method(self.model, "generate")
        else:
            self.model.to(self.args.device)
        return self.model

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        load_training_weights(self.model if model is None else model, resume_from_checkpoint)
