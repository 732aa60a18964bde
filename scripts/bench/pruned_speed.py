"""Full vs pruned SpeechLLM speed, side by side in one run (issue 6): decoder parameters, prefill ms, per-token
decode ms (KV cache), real-time factor, peak memory, and the measured decode speed-up against the FLOP ideal
(goal: >= 0.9 x ideal).

The default model is ``SpeechLLMConfig()`` (Whisper tiny.en + SmolLM2-135M from checkpoints/pretrained; the
projector is untrained, which does not matter for speed) on a few espeak utterances. The pruned variant is the
same object with 12 of 30 decoder layers masked (the block 14..25 by default, or ``--plan plan.json``).
Every option is a YAML key (``--config``, ``--print_config``); see
:mod:`lightning_speechllm.evaluation.efficiency`.

    python scripts/bench/pruned_speed.py
    python scripts/bench/pruned_speed.py --threads 2 --repeats 5 --max_new_tokens 48 --json_out speed.json
    python scripts/bench/pruned_speed.py --plan checkpoints/plans/angular_12.json
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_speechllm.evaluation.efficiency import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
