"""Adapter dirs to answers: `load` (adapter or merged dir), `merge` (LoRA folded into Qwen3
safetensors) and the streamed chat loop.

It may import `vlm_peft.model` and `vlm_peft.data`; never `training` or the CLI.
"""
