"""Data: manifests and corpora -> validated Lhotse cuts -> bucketed, DDP-sharded batches (`SpeechBatch`).
Also caches a frozen encoder's outputs of the train set (`encoder_cache`), computed by a function the model hands in.
May import: Lhotse, torch, soundfile; nothing else of this package (data flows one way, into `model`)."""
