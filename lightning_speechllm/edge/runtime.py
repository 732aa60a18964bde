"""Transcribe with llama.cpp: the ``gguf`` folder (text GGUF, mmproj, ``speech.json``) run through llama-cpp-python's
low-level API.

:meth:`LlamaCppSpeechModel.transcribe` is llama.cpp end to end: mtmd computes the log-mel, the Whisper encoder and
the projector from ``mmproj-f16.gguf`` (projector type ``glma``, see
:mod:`lightning_speechllm.model.llamacpp_layout`); the rows llama.cpp adds around the audio are dropped and, for a
model that reads only its utterance's positions, the window's positions past the audio too (the framework feeds
ceil(frames / k) of them); then the export's prompt (``speech.json``), tokenized by llama.cpp, with the speech
embeddings spliced where its placeholder is, and greedy decoding with llama.cpp's KV cache
(:meth:`LlamaCppSpeechModel.generate`, which also takes embeddings computed elsewhere).

Two differences from PyTorch remain, both measured by ``gguf-eval``: mtmd always encodes a 30 s window (a model
trained on a shorter one hears another context), and the last position of an utterance whose frames are not a
multiple of k stacks the window's next frames where the framework stacks zeros.

A Voxtral mmproj (``export --format voxtral``) is refused: in the pinned llama.cpp (llama-cpp-python 0.3.36) its
Voxtral graph average-pools the encoder frames by 2 before stacking 4 (Hugging Face's Voxtral does not pool: 375
positions per 30 s, llama.cpp 188), then aborts the process on its own count check ("expected output 187 tokens,
got 188").

Needs llama-cpp-python (``pip install -e '.[edge]'``: it builds llama.cpp from source, 6 min 32 s on 2 AVX2 cores).
"""
from __future__ import annotations

import ctypes
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["LlamaCppSpeechModel", "LlamaCppTranscript", "RuntimeUnavailable", "SpeechSpec"]

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 30 * SAMPLE_RATE
"""mtmd's audio window: one window is one audio chunk."""


class RuntimeUnavailable(RuntimeError):
    """llama-cpp-python is not installed, or llama.cpp refused a file or an input (the message names it)."""


@dataclass(frozen=True)
class SpeechSpec:
    """How the model reads speech: the ``speech.json`` that ``export --format llamacpp`` writes and ``gguf`` copies."""

    prompt: str
    speech_placeholder: str
    frames_per_position: int
    speech_positions: str = "utterance"
    """'utterance': the positions that cover the audio; 'window': every position of the 30 s window."""
    boundary_rows: int = 0
    """Rows llama.cpp's graph adds before and after the positions (GLM-ASR's begin/end of audio), dropped."""
    trained_window_seconds: float = 30.0
    """The encoder window the model was trained on (llama.cpp's is 30 s)."""

    @classmethod
    def read(cls, path: str | Path) -> SpeechSpec:
        info = json.loads(Path(path).read_text())
        try:
            return cls(info["prompt"], info["speech_placeholder"], int(info["frames_per_position"]),
                       info.get("speech_positions", "utterance"), int(info.get("boundary_rows", 0)),
                       float(info.get("trained_window_seconds", 30.0)))
        except KeyError as error:
            raise RuntimeUnavailable(f"{path}: no {error.args[0]!r} (write it with `gguf --source`)") from None

    def positions(self, n_samples: int) -> int:
        """Speech positions the framework feeds for `n_samples` of audio (one 30 s window): ceil(frames / k) of the
        frames covering the audio, or of the whole window."""
        from lightning_speechllm.model.encoders import WhisperSpeechEncoder

        covered = WINDOW_SAMPLES if self.speech_positions == "window" else n_samples
        frames = int(WhisperSpeechEncoder.frame_lengths(torch.tensor([covered]))[0])
        return -(-frames // self.frames_per_position)


@dataclass
class LlamaCppTranscript:
    """One greedy transcript and where its time went."""

    text: str
    tokens: list[int]
    audio_positions: int
    prompt_tokens: int
    encode_seconds: float
    """mtmd: log-mel, encoder and projector."""
    prefill_seconds: float
    """The prompt's text tokens and audio embeddings through the decoder, to the first token's logits."""
    decode_seconds: float
    """The generated tokens after the first."""
    timings: dict[str, float] = field(default_factory=dict)


def _llama():
    try:
        import llama_cpp
        from llama_cpp import mtmd_cpp
    except ImportError as error:  # pragma: no cover - only without the extra
        raise RuntimeUnavailable("llama-cpp-python is not installed: pip install -e '.[edge]' (it builds llama.cpp "
                                 "from source)") from error
    return llama_cpp, mtmd_cpp


class LlamaCppSpeechModel:
    """A text GGUF and its mmproj, loaded once; :meth:`transcribe` one 16 kHz waveform (up to 30 s) at a time."""

    def __init__(self, model_gguf: str | Path, mmproj_gguf: str | Path | None, speech: SpeechSpec,
                 n_threads: int = 2, n_ctx: int = 2048) -> None:
        """`speech`: the prompt with its placeholder and the speech positions (``speech.json``); `mmproj_gguf`:
        llama.cpp's audio encoder + projector (None: embeddings are given to :meth:`generate`)."""
        prompt, placeholder = speech.prompt, speech.speech_placeholder
        if prompt.count(placeholder) != 1:
            raise ValueError(f"the prompt must hold the speech placeholder {placeholder!r} once: {prompt!r}")
        self.speech = speech
        self.llama, self.mtmd_api = _llama()
        llama = self.llama
        llama.llama_backend_init()
        llama.llama_log_set(_silent_log_callback(), ctypes.c_void_p(0))
        self.model = llama.llama_model_load_from_file(str(model_gguf).encode(), llama.llama_model_default_params())
        if not self.model:
            raise RuntimeUnavailable(f"llama.cpp could not load {model_gguf}")
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_ctx, n_ctx
        params.n_threads = params.n_threads_batch = n_threads
        self.ctx = llama.llama_init_from_model(self.model, params)
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama.llama_model_n_embd(self.model)
        self.mtmd, self.mmproj_refusal = None, None
        if mmproj_gguf is not None:
            self._load_mmproj(Path(mmproj_gguf), n_threads)
        prefix, suffix = prompt.split(placeholder)
        self.prefix, self.suffix = self.tokenize(prefix), self.tokenize(suffix)

    def _load_mmproj(self, mmproj: Path, n_threads: int) -> None:
        from .gguf import gguf_summary

        kind = gguf_summary(mmproj)["metadata"].get("clip.projector_type")
        if kind == "voxtral":  # see the module docstring: this llama.cpp pools where HF's Voxtral does not
            self.mmproj_refusal = (f"{mmproj}: llama.cpp's Voxtral audio graph (llama-cpp-python 0.3.36) average-pools "
                                   "the encoder frames by 2 before stacking 4, unlike Hugging Face's Voxtral (375 "
                                   "positions per 30 s), and aborts on its own token count (187 expected, 188 made): "
                                   "pass the framework's speech embeddings to generate() instead")
            return
        self.mtmd_api.mtmd_log_set(_silent_log_callback(), ctypes.c_void_p(0))  # a line per audio chunk otherwise
        params = self.mtmd_api.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.print_timings = False, n_threads, False
        self.mtmd = self.mtmd_api.mtmd_init_from_file(str(mmproj).encode(), self.model, params)
        if not self.mtmd or not self.mtmd_api.mtmd_support_audio(self.mtmd):
            raise RuntimeUnavailable(f"llama.cpp could not load {mmproj} as an audio projector")

    @classmethod
    def from_dir(cls, gguf_dir: str | Path, kind: str = "f16", n_threads: int = 2) -> LlamaCppSpeechModel:
        """The ``gguf`` output folder: ``model-<kind>.gguf``, ``mmproj-f16.gguf`` and ``speech.json``."""
        from lightning_speechllm.model.llamacpp_layout import SPEECH_FILE

        gguf = Path(gguf_dir).expanduser()
        missing = [name for name in (f"model-{kind}.gguf", "mmproj-f16.gguf", SPEECH_FILE) if not (gguf / name).is_file()]
        if missing:
            raise RuntimeUnavailable(f"{gguf} has no {', '.join(missing)}: write it with `python -m lightning_speechllm "
                                     "gguf --source EXPORT/llamacpp --out DIR`")
        return cls(gguf / f"model-{kind}.gguf", gguf / "mmproj-f16.gguf", SpeechSpec.read(gguf / SPEECH_FILE),
                   n_threads=n_threads)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's token ids of `text`, special tokens parsed, no BOS added (the prompt writes its own)."""
        data = text.encode()
        buffer = (self.llama.llama_token * (len(data) + 8))()
        n = self.llama.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), False, True)
        if n < 0:
            raise RuntimeUnavailable(f"llama.cpp could not tokenize {text!r}")
        return list(buffer[:n])

    def audio_embeddings(self, wave: np.ndarray) -> np.ndarray:
        """[positions, n_embd] projector outputs of a 16 kHz float waveform (up to 30 s) by llama.cpp's audio path
        (mtmd), the positions the model reads (see the module docstring)."""
        if self.mtmd is None:
            raise RuntimeUnavailable(self.mmproj_refusal or "no mmproj was loaded: pass the speech embeddings")
        if not 0 < len(wave) <= WINDOW_SAMPLES:
            raise RuntimeUnavailable(f"audio of {len(wave) / SAMPLE_RATE:.2f} s: the model reads one 30 s window, "
                                     "cut longer audio first")
        window = self._window_embeddings(wave)
        rows = self.speech.boundary_rows
        window = window[rows: len(window) - rows]
        return window[: self.speech.positions(len(wave))]

    def _window_embeddings(self, wave: np.ndarray) -> np.ndarray:
        """All rows mtmd writes for the audio's one chunk."""
        api = self.mtmd_api
        samples = np.ascontiguousarray(wave, dtype=np.float32)
        bitmap = api.mtmd_bitmap_init_from_audio(len(samples), samples.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        chunks = api.mtmd_input_chunks_init()
        try:
            marker = api.mtmd_default_marker()
            text = api.mtmd_input_text(marker, len(marker), False, True)
            bitmaps = (api.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if api.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise RuntimeUnavailable("mtmd could not preprocess the audio")
            for index in range(api.mtmd_input_chunks_size(chunks)):
                chunk = api.mtmd_input_chunks_get(chunks, index)
                if api.mtmd_input_chunk_get_type(chunk) == api.MTMD_INPUT_CHUNK_TYPE_AUDIO:
                    if api.mtmd_encode_chunk(self.mtmd, chunk) != 0:
                        raise RuntimeUnavailable("mtmd could not encode the audio")
                    n = api.mtmd_input_chunk_get_n_tokens(chunk)
                    out = np.ctypeslib.as_array(api.mtmd_get_output_embd(self.mtmd), shape=(n * self.n_embd,))
                    return out.reshape(n, self.n_embd).copy()
            raise RuntimeUnavailable("mtmd gave no audio chunk")
        finally:
            api.mtmd_input_chunks_free(chunks)
            api.mtmd_bitmap_free(bitmap)

    def _decode(self, position: int, tokens: list[int] | None = None, embeddings: np.ndarray | None = None,
                logits_last: bool = False) -> int:
        """One batch of text tokens or embeddings at `position`; returns the next position."""
        llama = self.llama
        n = len(tokens) if tokens is not None else len(embeddings)
        batch = llama.llama_batch_init(n, 0 if tokens is not None else self.n_embd, 1)
        try:
            if embeddings is not None:
                flat = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1)
                ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
            for i in range(n):
                if tokens is not None:
                    batch.token[i] = tokens[i]
                batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = position + i, 1, 0
                batch.logits[i] = logits_last and i == n - 1
            batch.n_tokens = n
            if llama.llama_decode(self.ctx, batch) != 0:
                raise RuntimeUnavailable("llama_decode failed")
        finally:
            llama.llama_batch_free(batch)
        return position + n

    def _argmax(self, suppress_eog: bool = False) -> int:
        logits = np.ctypeslib.as_array(self.llama.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        token = int(logits.argmax())
        if suppress_eog and self.llama.llama_vocab_is_eog(self.vocab, token):
            order = np.argsort(-logits)
            token = int(next(t for t in order if not self.llama.llama_vocab_is_eog(self.vocab, int(t))))
        return token

    def last_logits(self) -> np.ndarray:
        """A copy of the logits after the last decoded token."""
        return np.ctypeslib.as_array(self.llama.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)).copy()

    def transcribe(self, wave: np.ndarray, max_new_tokens: int = 40, min_new_tokens: int = 0) -> LlamaCppTranscript:
        """Greedy decoding of the prompt around `wave`'s audio embeddings (mtmd's), up to an end-of-generation
        token after `min_new_tokens`."""
        start = time.perf_counter()
        embeddings = self.audio_embeddings(wave)
        return self.generate(embeddings, max_new_tokens, min_new_tokens, encode_seconds=time.perf_counter() - start)

    def generate(self, embeddings: np.ndarray, max_new_tokens: int = 40, min_new_tokens: int = 0,
                 encode_seconds: float = 0.0) -> LlamaCppTranscript:
        """Greedy decoding of the prompt around given speech `embeddings` [positions, n_embd] (the projector's
        outputs, from mtmd or from the framework), up to an end-of-generation token after `min_new_tokens`."""
        llama = self.llama
        encoded = time.perf_counter()
        llama.llama_memory_clear(llama.llama_get_memory(self.ctx), True)
        position = self._decode(0, tokens=self.prefix) if self.prefix else 0
        position = self._decode(position, embeddings=embeddings, logits_last=not self.suffix)
        if self.suffix:
            position = self._decode(position, tokens=self.suffix, logits_last=True)
        token, generated = self._argmax(), []
        prefilled = time.perf_counter()
        while len(generated) < max_new_tokens:
            if llama.llama_vocab_is_eog(self.vocab, token) and len(generated) >= min_new_tokens:
                break
            generated.append(token)
            if len(generated) == max_new_tokens:
                break
            position = self._decode(position, tokens=[token], logits_last=True)
            token = self._argmax(suppress_eog=len(generated) < min_new_tokens)
        done = time.perf_counter()
        return LlamaCppTranscript(self.detokenize(generated), generated, len(embeddings),
                                  len(self.prefix) + len(embeddings) + len(self.suffix), encode_seconds,
                                  prefilled - encoded, done - prefilled)

    def detokenize(self, tokens: list[int]) -> str:
        pieces = []
        buffer = ctypes.create_string_buffer(256)
        for token in tokens:
            n = self.llama.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
            pieces.append(buffer.raw[:max(n, 0)])
        return b"".join(pieces).decode("utf-8", errors="replace").strip()

    def close(self) -> None:
        if self.mtmd is not None:
            self.mtmd_api.mtmd_free(self.mtmd)
        self.llama.llama_free(self.ctx)
        self.llama.llama_model_free(self.model)


@functools.cache
def _silent_log_callback():
    """One llama.cpp log callback that drops every line, kept alive for the process (llama.cpp holds its pointer)."""
    llama, _ = _llama()
    return llama.llama_log_callback(lambda level, text, user_data: None)
