"""Model: speech encoder -> projector -> HF causal LLM with decoder-layer and sub-layer masks (`SpeechLLM`), replacement
modules for removed blocks, and its LightningModule; prompts, checkpoints (trainable weights only) and export here too.
May import: `data` (the batch contract), `evaluation.metrics`, config and I/O helpers."""
