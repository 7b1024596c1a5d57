"""Recipes to adapter dirs: the YAML recipe schema, the TRL SFTTrainer subclass, the per-stage
run (`stages.train`) and evaluation (exact match, answer-token accuracy).

It may import `vlm_peft.model`, `vlm_peft.data` and the leaf `vlm_peft.tiny` (random tiny models
for `random` recipes); never `serving` or the CLI.
"""
