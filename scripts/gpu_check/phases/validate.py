"""Phase ``validate``: ``Trainer.validate`` with generation (greedy, a few utterances): loss, WER, seconds."""
from __future__ import annotations

import time
from typing import Any

from ..context import Context, trainer
from ..helpers import finite_float


def phase_validate(ctx: Context) -> dict[str, Any]:
    module, dm = ctx.fit["module"], ctx.fit["datamodule"]
    started = time.perf_counter()
    [metrics] = trainer(ctx, "validate", validate=True).validate(module, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - started
    hypotheses = module.gathered_hypotheses()
    return {"validate_s": seconds, "utterances": len(hypotheses), "max_new_tokens": ctx.opts.sizes.max_new_tokens,
            "utterances_per_s": len(hypotheses) / seconds if seconds else None,
            "metrics": {k: finite_float(v) for k, v in sorted(metrics.items())},
            "hypothesis_example": hypotheses[0].hypothesis[:120] if hypotheses else None}
