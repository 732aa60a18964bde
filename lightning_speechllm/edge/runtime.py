"""Transcribe with llama.cpp: a Voxtral-layout GGUF pair (``gguf``) run through llama-cpp-python's low-level API.

The decoder runs in llama.cpp: the export's own prompt (``pruning.json``: the framework's prompt with its speech
placeholder), tokenized by llama.cpp, with the speech embeddings spliced where the placeholder is, then greedy
decoding with llama.cpp's KV cache (:meth:`LlamaCppSpeechModel.generate`).

The speech embeddings come from the framework's encoder and projector. llama.cpp's own audio path (mtmd) would
compute them from the ``mmproj`` file, but in the pinned llama.cpp (llama-cpp-python 0.3.36) its Voxtral graph
average-pools the encoder frames by 2 before stacking 4 (Hugging Face's Voxtral does not pool: 375 positions per 30 s,
llama.cpp 188), and then aborts the process on its own count check ("expected output 187 tokens, got 188"); so
:meth:`LlamaCppSpeechModel.audio_embeddings` refuses a Voxtral mmproj instead of crashing. mtmd's tokenizer would
also write Voxtral's ``[BEGIN_AUDIO]`` text before the audio, which our models never saw.

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

__all__ = ["LlamaCppSpeechModel", "LlamaCppTranscript", "RuntimeUnavailable"]


class RuntimeUnavailable(RuntimeError):
    """llama-cpp-python is not installed, or llama.cpp refused a file (the message names it)."""


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
    """A text GGUF and its mmproj, loaded once; :meth:`transcribe` one 16 kHz waveform at a time."""

    def __init__(self, model_gguf: str | Path, mmproj_gguf: str | Path | None, prompt: str, placeholder: str,
                 n_threads: int = 2, n_ctx: int = 2048) -> None:
        """`prompt`: the framework's prompt with `placeholder` where the speech goes (``pruning.json`` of the
        export holds both); `mmproj_gguf`: llama.cpp's audio encoder + projector (None: embeddings are given)."""
        if prompt.count(placeholder) != 1:
            raise ValueError(f"the prompt must hold the speech placeholder {placeholder!r} once: {prompt!r}")
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
        params = self.mtmd_api.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.print_timings = False, n_threads, False
        self.mtmd = self.mtmd_api.mtmd_init_from_file(str(mmproj).encode(), self.model, params)
        if not self.mtmd or not self.mtmd_api.mtmd_support_audio(self.mtmd):
            raise RuntimeUnavailable(f"llama.cpp could not load {mmproj} as an audio projector")

    @classmethod
    def from_export(cls, gguf_dir: str | Path, voxtral_dir: str | Path, kind: str = "f16",
                    n_threads: int = 2) -> LlamaCppSpeechModel:
        """The ``gguf`` output's ``model-<kind>.gguf`` and ``mmproj-f16.gguf``, prompted as ``pruning.json`` of the
        ``voxtral/`` export says."""
        info = json.loads((Path(voxtral_dir) / "pruning.json").read_text())
        gguf = Path(gguf_dir)
        return cls(gguf / f"model-{kind}.gguf", gguf / "mmproj-f16.gguf", info["prompt"], info["speech_placeholder"],
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
        """[positions, n_embd] projector outputs of a 16 kHz float waveform, by llama.cpp's audio path (mtmd)."""
        if self.mtmd is None:
            raise RuntimeUnavailable(self.mmproj_refusal or "no mmproj was loaded: pass the speech embeddings")
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

    def transcribe(self, wave: np.ndarray, max_new_tokens: int = 40) -> LlamaCppTranscript:
        """Greedy decoding of the prompt around `wave`'s audio embeddings (mtmd's), up to an end-of-generation
        token."""
        start = time.perf_counter()
        embeddings = self.audio_embeddings(wave)
        return self.generate(embeddings, max_new_tokens, encode_seconds=time.perf_counter() - start)

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
