"""Dataset tools for vlm-peft demos: small synthetic datasets in the canonical jsonl + images format,
so the CPU demo can train and evaluate without downloading anything."""
