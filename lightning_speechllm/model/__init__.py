"""Model: speech encoder -> projector -> HF causal LLM with decoder-layer masks (`SpeechLLM`), and its LightningModule.
Prompts, checkpoints (trainable weights only) and export of pruned decoders live here too.
May import: `data` (the batch contract), `evaluation.metrics`, config and I/O helpers."""
