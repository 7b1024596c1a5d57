"""What `attach` puts on a Qwen3: the VLM config, the projector, the vision tower, the hooks that
splice image embeddings into the placeholder positions, adapter dirs (save / load) and LoRA.

The bottom layer: it imports only torch, transformers, peft and safetensors, never `vlm_peft.data`,
`training`, `serving` or the CLI, so a model can be attached and saved without any of them.
"""
