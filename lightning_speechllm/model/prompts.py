"""Prompt construction: one place that turns (task, target text) into token ids and segment ids.

The prompt is rendered with the LLM's chat template when it has one (else a plain template) around a speech
placeholder; the text before and after the placeholder is tokenized once per (task, language) and cached. The model
splices speech embeddings (or, in text-only mode, the transcript's token embeddings) where the placeholder was.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache

from transformers import PreTrainedTokenizerBase

from lightning_speechllm.model.segments import Segment

SPEECH_PLACEHOLDER = "<|speech|>"
TASKS = ("asr", "ast")


class PromptError(ValueError):
    """A task, language or template the prompt builder cannot use."""


@dataclass
class PromptConfig:
    """How the instruction around the speech is written."""

    asr_instruction: str = "Transcribe the audio."
    """Instruction for speech recognition."""
    ast_instruction: str = "Translate the audio into {tgt_lang}."
    """Instruction for speech translation; {tgt_lang} is replaced by the language name."""
    use_chat_template: bool | None = None
    """True/False forces it; None uses the tokenizer's chat template when it has one."""
    system_prompt: str | None = None
    """Optional system message (chat template only)."""
    plain_template: str = "{speech}\n{instruction}\nAnswer:"
    """Template used without a chat template; must contain {speech} and {instruction}."""
    instruction_first: bool = False
    """Chat template only: the user turn is "instruction, newline, speech" instead of "speech, newline,
    instruction". The tokens after the speech are then the template's alone, and the instruction joins the prefix
    that every row of a training batch shares (run once per batch), so each row is shorter."""


LANGUAGE_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian",
                  "pt": "Portuguese", "nl": "Dutch", "zh": "Chinese", "ja": "Japanese", "ru": "Russian"}


@dataclass(frozen=True)
class PromptPieces:
    """Token ids around the speech for one (task, language)."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]


@dataclass
class EncodedSample:
    """Token ids of one sample, with the speech span left as a count to fill."""

    prefix: list[int]
    speech_tokens: list[int] | None
    """Transcript token ids in text-only mode; None when speech embeddings are spliced."""
    suffix: list[int]
    target: list[int]

    def segment_ids(self, speech_len: int) -> list[int]:
        return ([Segment.PROMPT] * len(self.prefix) + [Segment.SPEECH] * speech_len
                + [Segment.PROMPT] * len(self.suffix) + [Segment.TARGET] * len(self.target))


class PromptBuilder:
    """Tokenizes prompts and targets for ASR and speech translation."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: PromptConfig | None = None,
                 chat_renderer: Callable[[list[dict]], str | list[int]] | None = None,
                 audio_token: str | None = None) -> None:
        """`chat_renderer` (with the `audio_token` it writes): a released model's processor template, rendered on
        messages whose user content is an audio item and the instruction; None: the tokenizer's template."""
        self.tokenizer = tokenizer
        self.config = config or PromptConfig()
        self.chat_renderer, self.audio_token = chat_renderer, audio_token
        if chat_renderer is not None and not audio_token:
            raise PromptError("a chat_renderer needs the audio_token its template writes")
        if chat_renderer is not None and self.config.use_chat_template is False:
            raise PromptError("model.prompt.use_chat_template is false, but a released model (model.pretrained) is "
                              "always prompted through its own processor's chat template: leave it null")
        if "{speech}" not in self.config.plain_template or "{instruction}" not in self.config.plain_template:
            raise PromptError("PromptConfig.plain_template must contain {speech} and {instruction}")
        use_chat = self.config.use_chat_template
        has_template = bool(tokenizer.chat_template) or chat_renderer is not None
        self.uses_chat_template = has_template if use_chat is None else use_chat
        if self.uses_chat_template and not has_template:
            raise PromptError("use_chat_template=True but the tokenizer has no chat template")
        if tokenizer.eos_token_id is None:
            raise PromptError("the tokenizer has no eos token; set tokenizer.eos_token before building prompts")
        self.pieces = lru_cache(maxsize=64)(self._pieces)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @cached_property
    def end_token_id(self) -> int:
        """The token that ends a target: the chat template's end-of-turn token (``<|eot_id|>`` for Llama 3,
        ``<|im_end|>`` for Qwen2.5 base, whose EOS is ``<|endoftext|>``) when it closes the assistant turn with a
        special token, else the tokenizer's EOS."""
        if not self.uses_chat_template:
            return self.eos_token_id
        marker = "@@speechllm-target@@"
        if self.chat_renderer is not None and isinstance(self.render("asr", None), list):
            return self.eos_token_id  # a tokenizer that renders ids itself (mistral-common): turns end with EOS
        try:
            if self.chat_renderer is not None:  # a processor template: content as lists of items
                text = self.chat_renderer([{"role": "user", "content": [{"type": "text", "text": "x"}]},
                                           {"role": "assistant", "content": [{"type": "text", "text": marker}]}])
            else:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # noqa: BLE001 - templates that refuse this conversation keep EOS
            return self.eos_token_id
        after = text.split(marker, 1)[1] if marker in text else ""
        ids = self.tokenize(after.lstrip(" "))
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        return ids[0] if ids and ids[0] in special else self.eos_token_id

    def instruction(self, task: str, tgt_lang: str | None) -> str:
        if task == "asr":
            return self.config.asr_instruction
        if task == "ast":
            if not tgt_lang:
                raise PromptError("task 'ast' needs a target language (tgt_lang)")
            return self.config.ast_instruction.format(tgt_lang=LANGUAGE_NAMES.get(tgt_lang, tgt_lang))
        raise PromptError(f"unknown task {task!r}; expected one of {TASKS}")

    def render(self, task: str, tgt_lang: str | None) -> str | list[int]:
        """The prompt text with SPEECH_PLACEHOLDER where the speech goes (generation prompt included); token ids
        for a released model whose tokenizer renders them itself (Voxtral)."""
        instruction = self.instruction(task, tgt_lang)
        if self.chat_renderer is not None:
            return self._render_with_audio_content(instruction)
        if not self.uses_chat_template:
            return self.config.plain_template.format(speech=SPEECH_PLACEHOLDER, instruction=instruction)
        messages = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        content = (f"{instruction}\n{SPEECH_PLACEHOLDER}" if self.config.instruction_first
                   else f"{SPEECH_PLACEHOLDER}\n{instruction}")
        messages.append({"role": "user", "content": content})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _render_with_audio_content(self, instruction: str) -> str | list[int]:
        """A released model's prompt: its processor's template on an audio item and the instruction, with the one
        audio placeholder it writes (and its own markers around it) turned into SPEECH_PLACEHOLDER."""
        audio, text = {"type": "audio"}, {"type": "text", "text": instruction}
        messages = [{"role": "system", "content": [{"type": "text", "text": self.config.system_prompt}]}
                    if self.config.system_prompt else None,
                    {"role": "user", "content": [text, audio] if self.config.instruction_first else [audio, text]}]
        rendered = self.chat_renderer([m for m in messages if m is not None])
        if isinstance(rendered, list):  # token ids, the audio tokens already written: _pieces splits around them
            return rendered
        if rendered.count(self.audio_token) != 1:
            raise PromptError(f"the processor's chat template must write its audio token {self.audio_token!r} once "
                              f"for one audio item: {rendered!r}")
        return rendered.replace(self.audio_token, SPEECH_PLACEHOLDER)

    def _pieces(self, task: str, tgt_lang: str | None) -> PromptPieces:
        text = self.render(task, tgt_lang)
        if isinstance(text, list):
            return self._pieces_around_audio_ids(text)
        if text.count(SPEECH_PLACEHOLDER) != 1:
            raise PromptError(f"the rendered prompt must hold the speech placeholder exactly once: {text!r}")
        before, after = text.split(SPEECH_PLACEHOLDER)
        prefix = self.tokenize(before)
        if not self.uses_chat_template and self._adds_bos():
            prefix = [self.tokenizer.bos_token_id, *prefix]
        return PromptPieces(tuple(prefix), tuple(self.tokenize(after)))

    def _pieces_around_audio_ids(self, ids: list[int]) -> PromptPieces:
        """Prefix and suffix of a prompt rendered to ids: everything before and after its one run of audio tokens."""
        audio = self.tokenizer.convert_tokens_to_ids(self.audio_token)
        where = [i for i, token in enumerate(ids) if token == audio]
        if not where or where[-1] - where[0] + 1 != len(where):
            raise PromptError(f"the rendered prompt must hold one run of the audio token {self.audio_token!r}: {ids}")
        return PromptPieces(tuple(ids[:where[0]]), tuple(ids[where[-1] + 1:]))

    def _adds_bos(self) -> bool:
        bos = self.tokenizer.bos_token_id
        return bos is not None and self.tokenizer("a").input_ids[:1] == [bos]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens (how targets and transcripts are tokenized)."""
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def encode(self, task: str, tgt_lang: str | None, target: str | None, transcript: str | None = None,
               text_only: bool = False) -> EncodedSample:
        """Token ids for one sample; `target=None` builds a generation prompt (no target tokens)."""
        pieces = self.pieces(task, tgt_lang)
        target_ids = [] if target is None else [*self.tokenize(target.strip()), self.end_token_id]
        speech_tokens = None
        if text_only:
            if not transcript or not transcript.strip():
                raise PromptError("text-only mode needs a non-empty transcript")
            speech_tokens = self.tokenize(transcript.strip())
        return EncodedSample(list(pieces.prefix), speech_tokens, list(pieces.suffix), target_ids)
