"""The demo: two-digit addition on a tiny Qwen3, warm-started by SFT, then trained with GRPO.

`task` writes the prompts, `tokenizer` builds the character-level tokenizer, `warmstart`
prepares the checkpoint the mesh starts from (`python -m slipstream.demo.warmstart` runs that
preparation alone). The RL run itself goes through the full service mesh like any other run.
"""
