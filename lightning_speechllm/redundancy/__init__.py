"""Layer-redundancy measurement: angular distance d(l, n), Block Influence, sublayer maps, pruning path, statistics,
agreement of maps, plots, and the validation callback / `measure` and `compare` commands that write them.
May import: `data`, `model`, config and I/O helpers (never `pruning`, `healing` or `evaluation`)."""
from lightning_speechllm.redundancy.analysis import (
    FORMAT_VERSION,
    AgreementCI,
    PathAgreement,
    PermutationNull,
    RedundancyResult,
    block_influence_ranking,
    bootstrap_agreement,
    bootstrap_ci,
    path_agreement,
    path_null,
    pruning_path,
    spearman_null,
    spearman_rho,
    valid_cells,
)
from lightning_speechllm.redundancy.metrics import (
    TOKEN_SELECTIONS,
    AngularDistanceMetric,
    BlockInfluenceMetric,
    TokenSelection,
    select_tokens,
)

__all__ = [
    "FORMAT_VERSION",
    "AgreementCI",
    "TOKEN_SELECTIONS",
    "AngularDistanceMetric",
    "BlockInfluenceMetric",
    "PathAgreement",
    "PermutationNull",
    "RedundancyResult",
    "TokenSelection",
    "block_influence_ranking",
    "bootstrap_agreement",
    "bootstrap_ci",
    "path_agreement",
    "path_null",
    "pruning_path",
    "select_tokens",
    "spearman_null",
    "spearman_rho",
    "valid_cells",
]
