"""Released SpeechLLMs (Qwen2-Audio, ...) loaded in their own class and run through the framework's parts."""
from .families import (
    FAMILIES,
    NOT_YET,
    REFUSED,
    ReleasedFamily,
    ReleasedModelError,
    detect_family,
    is_released_dir,
    read_model_type,
)
from .parts import (
    ReleasedAudioEncoder,
    ReleasedOrigin,
    ReleasedParts,
    ReleasedProjector,
    decoder_view,
    load_released,
    parts_from_model,
)

__all__ = ["FAMILIES", "NOT_YET", "REFUSED", "ReleasedAudioEncoder", "ReleasedFamily", "ReleasedModelError",
           "ReleasedOrigin", "ReleasedParts", "ReleasedProjector", "decoder_view", "detect_family", "is_released_dir",
           "load_released", "parts_from_model", "read_model_type"]
