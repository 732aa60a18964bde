"""A pruned SpeechLLM on an edge runtime: GGUF files from llama.cpp's own converter (:mod:`.gguf`)."""
from .gguf import GGUF_OUTTYPES, LLAMA_CPP_SDIST, GGUFExportError, convert_export, converter_dir, gguf_summary

__all__ = ["GGUF_OUTTYPES", "LLAMA_CPP_SDIST", "GGUFExportError", "convert_export", "converter_dir", "gguf_summary"]
