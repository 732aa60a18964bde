"""lightning_speechllm: measure, prune and heal SpeechLLM decoder layers."""
__version__ = "0.1.0"
