"""Tiny random released SpeechLLMs saved with `save_pretrained` (no hub): the model, its processor and tokenizer.

Each family keeps what makes it differ: Qwen2-Audio's tower mask over conv frames and its audio markers, Audio
Flamingo 3's mel-frame mask argument, GLM-ASR's rotary tower and 4 frames stacked per position (a Llama decoder),
Voxtral's 30 s window of 375 positions and its mistral-common tokenizer (a `tekken.json` cut from the one that
mistral-common ships, with Voxtral's audio section and [AUDIO] at id 24, where `VoxtralProcessor` expects it),
Qwen2.5-Omni's whole-model directory (the thinker nested in `thinker_config`, a vision tower the export carries,
its packed, chunked audio tower with its own projection, 3-D rotary positions), Granite Speech's unmasked
Conformer, windowed Q-Former, Granite multipliers and shipped audio LoRA adapter, Phi-4-multimodal's towers inside
its decoder's embedding, fused projections and `speech-lora/` adapter, Qwen3-ASR's chunked 2-D convolutions and
windowed attention over a batch padded to its longest.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from transformers import WhisperFeatureExtractor

from tests.tiny_speechllm import tiny_tokenizer

WINDOW_SECONDS = 4
"""The tiny towers' audio window (the real ones have 30 s): 4 s keeps the tests fast."""
FAMILIES = ("qwen2_audio", "audioflamingo3", "glmasr", "voxtral", "qwen2_5_omni", "granite_speech",
            "phi4_multimodal", "qwen3_asr")

# A ChatML template of the processors' kind: content is a string or a list of audio / text items.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for item in m['content'] %}{% if item['type'] == 'audio' %}AUDIO_TEXT\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TEXT = {"num_hidden_layers": 4, "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False,
         "initializer_range": 0.2}
_TOWER = {"num_mel_bins": 80, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 128}
# family -> (config class, processor class, decoder model_type, tower keys, special tokens, audio token, audio text)
_SPECS = {
    "qwen2_audio": ("Qwen2AudioConfig", "Qwen2AudioProcessor", "qwen2",
                    {"model_type": "qwen2_audio_encoder", "d_model": 32, "encoder_layers": 2,
                     "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "num_mel_bins": 80,
                     "max_source_positions": WINDOW_SECONDS * 50},
                    ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"], "<|AUDIO|>", None),
    "audioflamingo3": ("AudioFlamingo3Config", "AudioFlamingo3Processor", "qwen2",
                       {"model_type": "audioflamingo3_encoder", **_TOWER, "max_source_positions": WINDOW_SECONDS * 50},
                       ["<sound>"], "<sound>", "<sound>"),
    "glmasr": ("GlmAsrConfig", "GlmAsrProcessor", "llama",
               {"model_type": "glmasr_encoder", **_TOWER, "num_key_value_heads": 2, "max_position_embeddings": 512},
               ["<|pad|>", "<|begin_of_audio|>", "<|end_of_audio|>"], "<|pad|>",
               "<|begin_of_audio|><|pad|><|end_of_audio|>"),
}


def save_tiny_released(family: str, directory: Path, seed: int = 0) -> Path:
    """A 4-layer decoder with a 2-layer audio tower and a 4 s window (Voxtral: 30 s), as a stock directory of
    `family`'s class."""
    if family == "voxtral":
        return _save_tiny_voxtral(directory, seed)
    if family == "qwen2_5_omni":
        return _save_tiny_qwen2_5_omni(directory, seed)
    if family == "granite_speech":
        return _save_tiny_granite_speech(directory, seed)
    if family == "phi4_multimodal":
        return _save_tiny_phi4_multimodal(directory, seed)
    if family == "qwen3_asr":
        return _save_tiny_qwen3_asr(directory, seed)
    config_class, processor_class, decoder_type, tower, special, audio_token, audio_text = _SPECS[family]
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    config = getattr(transformers, config_class)(
        audio_config=tower, text_config={"model_type": decoder_type, "vocab_size": len(tokenizer), **_TEXT},
        audio_token_id=tokenizer.convert_tokens_to_ids(audio_token))
    model = _random_model(config_class.replace("Config", "ForConditionalGeneration"), config, seed)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    _save_model(model, tokenizer, directory)
    features = WhisperFeatureExtractor(feature_size=80, chunk_length=WINDOW_SECONDS)
    processor = getattr(transformers, processor_class)
    if audio_text is None:  # Qwen2-Audio's processor brings its own default template and markers
        processor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(directory)
    else:
        processor(feature_extractor=features, tokenizer=tokenizer, audio_token=audio_token,
                  chat_template=_CHAT_TEMPLATE.replace("AUDIO_TEXT", audio_text)).save_pretrained(directory)
    return directory


def _random_model(class_name: str, config, seed: int):
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():  # larger random weights than HF's init, so that every layer moves the residual stream
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2 and "language_model" in name:
                param.normal_(0.0, 0.2)
    return model


def _save_model(model, tokenizer, directory: Path) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)


def _tiny_tekken(directory: Path, vocab: int = 900, specials: int = 100) -> Path:
    """A mistral-common tokenizer file: the first `vocab` tokens of the tekken file mistral-common ships, its
    special tokens with [AUDIO] at rank 24 and [BEGIN_AUDIO] at 25, and Voxtral's audio section (16 kHz, 12.5
    audio tokens per second, 30 s chunks)."""
    import mistral_common
    from mistral_common.tokens.tokenizers.base import SpecialTokens

    shipped = json.loads((Path(mistral_common.__file__).parent / "data" / "tekken_240911.json").read_text())
    names = [token.value for token in SpecialTokens if token.value not in ("[AUDIO]", "[BEGIN_AUDIO]")]
    names = names[:22] + ["<SPECIAL_22>", "<SPECIAL_23>", "[AUDIO]", "[BEGIN_AUDIO]"] + names[22:]
    names += [f"<SPECIAL_{rank}>" for rank in range(len(names), specials)]
    tekken = {"config": {**shipped["config"], "version": "v7", "default_vocab_size": specials + vocab,
                         "default_num_special_tokens": specials, "num_vocab_tokens": vocab},
              "vocab": shipped["vocab"][:vocab],
              "special_tokens": [{"rank": rank, "token_str": name, "is_control": True}
                                 for rank, name in enumerate(names)],
              "audio": {"sampling_rate": 16000, "frame_rate": 12.5, "chunk_length_s": 30.0,
                        "audio_encoding_config": {"num_mel_bins": 80, "hop_length": 160, "window_size": 400}}}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tekken.json").write_text(json.dumps(tekken))
    return directory


def _save_tiny_voxtral(directory: Path, seed: int) -> Path:
    from transformers.tokenization_mistral_common import MistralCommonBackend

    tokenizer = MistralCommonBackend.from_pretrained(_tiny_tekken(directory))
    config = transformers.VoxtralConfig(
        audio_config={"model_type": "voxtral_encoder", **_TOWER, "max_source_positions": 1500},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), **_TEXT},
        audio_token_id=tokenizer.convert_tokens_to_ids("[AUDIO]"))
    model = _random_model("VoxtralForConditionalGeneration", config, seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    _save_model(model, tokenizer, directory)
    processor = transformers.VoxtralProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80),
                                              tokenizer=tokenizer)
    processor.save_pretrained(directory)
    return directory


def _tokenizer_with(directory: Path, named: dict[str, str]):
    """The tiny tokenizer saved in `directory` and reloaded with the processor's named special tokens (its
    ``audio_token`` attribute and the like, as the hub's tokenizer configs declare them), and their ids by name."""
    from transformers import AutoTokenizer

    tiny_tokenizer().save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory, extra_special_tokens=named)
    return tokenizer, {name: tokenizer.convert_tokens_to_ids(token) for name, token in named.items()}


_OMNI_TOKENS = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
                "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
                "vision_eos_token": "<|vision_eos|>"}


def _save_tiny_qwen2_5_omni(directory: Path, seed: int) -> Path:
    """A Qwen2.5-Omni directory as the hub has it (model_type qwen2_5_omni, the thinker's config nested), without
    the talker (enable_audio_output false): the framework loads and exports the thinker."""
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer, ids = _tokenizer_with(directory, _OMNI_TOKENS)
    head = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]
    thinker = {
        "text_config": {**_TEXT, "vocab_size": len(tokenizer), "tie_word_embeddings": False,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                            "mrope_section": [head // 6, head // 6, head // 2 - 2 * (head // 6)]}},
        "audio_config": {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                         "num_mel_bins": 80, "output_dim": _TEXT["hidden_size"], "n_window": 25,
                         "max_source_positions": WINDOW_SECONDS * 50},
        "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                          "out_hidden_size": _TEXT["hidden_size"], "fullatt_block_indexes": [0]},
        "audio_token_id": ids["audio_token"], "image_token_id": ids["image_token"],
        "video_token_id": ids["video_token"], "audio_start_token_id": ids["audio_bos_token"],
        "audio_end_token_id": ids["audio_eos_token"], "vision_start_token_id": ids["vision_bos_token"],
        "vision_end_token_id": ids["vision_eos_token"], "initializer_range": 0.2}
    config = transformers.Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False)
    model = _random_model("Qwen2_5OmniForConditionalGeneration", config, seed)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    _save_model(model, tokenizer, directory)
    transformers.Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
        feature_extractor=WhisperFeatureExtractor(feature_size=80, chunk_length=WINDOW_SECONDS), tokenizer=tokenizer,
        chat_template=_CHAT_TEMPLATE.replace("AUDIO_TEXT", "<|audio_bos|><|AUDIO|><|audio_eos|>")
    ).save_pretrained(directory)
    return directory


def _save_tiny_granite_speech(directory: Path, seed: int, adapter: bool = True) -> Path:
    """Granite Speech: a 2-block Conformer (20-frame attention blocks), a windowed Q-Former (15 frames -> 3
    positions), a Granite decoder whose multipliers and logits scaling are not 1, and (`adapter`) the LoRA adapter
    its directory ships and its class switches on for audio inputs (random, so that merging it matters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GraniteSpeechFeatureExtractor

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|audio|>"]})
    text = {**_TEXT, "model_type": "granite", "vocab_size": len(tokenizer), "embedding_multiplier": 2.0,
            "residual_multiplier": 0.5, "attention_multiplier": 0.25, "logits_scaling": 4.0}
    config = transformers.GraniteSpeechConfig(
        text_config=text,
        encoder_config={"input_dim": 160, "num_layers": 2, "hidden_dim": 32, "feedforward_mult": 2, "num_heads": 2,
                        "dim_head": 16, "output_dim": 8, "context_size": 20, "max_pos_emb": 20, "dropout": 0.0},
        projector_config={"model_type": "blip_2_qformer", "hidden_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 64, "encoder_hidden_size": 32,
                          "cross_attention_frequency": 1},
        audio_token_index=tokenizer.convert_tokens_to_ids("<|audio|>"), has_lora_adapter=adapter,
        tie_word_embeddings=False, initializer_range=0.2)
    model = _random_model("GraniteSpeechForConditionalGeneration", config, seed)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    _save_model(model, tokenizer, directory)
    if adapter:  # saved beside the base weights, as the hub's directories hold it
        lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.2)
        lora.save_pretrained(directory)
    transformers.GraniteSpeechProcessor(audio_processor=GraniteSpeechFeatureExtractor(), tokenizer=tokenizer,
                                        chat_template=tokenizer.chat_template).save_pretrained(directory)
    return directory


_PHI4_TOKENS = {"audio_token": "<|audio|>", "image_token": "<|image|>"}


def _save_tiny_phi4_multimodal(directory: Path, seed: int) -> Path:
    """Phi-4-multimodal: the audio tower and speech projection inside the decoder's multimodal embedding, a tiny
    vision tower beside them, fused qkv / gate-up projections, and the speech LoRA in `speech-lora/` (random)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Phi4MultimodalFeatureExtractor, Phi4MultimodalImageProcessor

    tokenizer, ids = _tokenizer_with(directory, _PHI4_TOKENS)
    text = {key: value for key, value in _TEXT.items() if key != "initializer_range"}
    config = transformers.Phi4MultimodalConfig(
        **text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), initializer_range=0.2,
        audio_config={"hidden_size": 32, "intermediate_size": 64, "num_blocks": 2, "num_attention_heads": 2,
                      "ext_pw_out_channel": 32, "depthwise_separable_out_channel": 32, "nemo_conv_channels": 32,
                      "bias_max_distance": 50, "audio_token_id": ids["audio_token"]},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 28, "crop_size": 28, "image_token_id": ids["image_token"]})
    model = _random_model("Phi4MultimodalForCausalLM", config, seed)
    with torch.no_grad():  # its decoder sits at `model`, not `language_model`
        for name, param in model.model.layers.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = config.eos_token_id
    _save_model(model, tokenizer, directory)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"],
                                            layers_to_transform=list(range(4)), layers_pattern="layers"))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    lora.save_pretrained(directory / "speech-lora")
    transformers.Phi4MultimodalProcessor(
        image_processor=Phi4MultimodalImageProcessor(), audio_processor=Phi4MultimodalFeatureExtractor(),
        tokenizer=tokenizer).save_pretrained(directory)  # its chat template is the tokenizer's, as the hub's is
    return directory


def _save_tiny_qwen3_asr(directory: Path, seed: int) -> Path:
    """Qwen3-ASR: mels padded to whole 1 s chunks, three stride-2 2-D convolutions per chunk, attention within
    2-chunk windows, its output packed; a separate projector and a Qwen3 decoder."""
    from transformers import Qwen3ASRFeatureExtractor

    tokenizer, _ = _tokenizer_with(directory, {"audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>",
                                               "audio_eos_token": "<|audio_end|>"})
    config = transformers.Qwen3ASRConfig(
        audio_config={"num_mel_bins": 80, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                      "d_model": 32, "output_dim": _TEXT["hidden_size"], "n_window": 50, "n_window_infer": 200,
                      "downsample_hidden_size": 8},
        text_config={**_TEXT, "model_type": "qwen3", "vocab_size": len(tokenizer), "head_dim": 12},
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio_pad|>"), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), tie_word_embeddings=False, initializer_range=0.2)
    model = _random_model("Qwen3ASRForConditionalGeneration", config, seed)
    model.generation_config.eos_token_id = config.eos_token_id
    _save_model(model, tokenizer, directory)
    transformers.Qwen3ASRProcessor(
        feature_extractor=Qwen3ASRFeatureExtractor(feature_size=80), tokenizer=tokenizer,
        chat_template=_CHAT_TEMPLATE.replace("AUDIO_TEXT", "<|audio_start|><|audio_pad|><|audio_end|>")
    ).save_pretrained(directory)
    return directory
