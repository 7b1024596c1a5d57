"""Rows to batches: the canonical dataset format (`rows`), reading files into Arrow (`loading`) or as a
stream (`streaming`), the processor and its chat template, the training collator and the feature cache
of precomputed vision features.

It may import `vlm_peft.model` (placeholder runs, the vision tower) and never `training`,
`serving` or the CLI.
"""
