"""Layer-redundancy measurement: angular distance d(l, n), Block Influence, pruning path, statistics, plots."""
from lightning_speechllm.redundancy.analysis import (
    FORMAT_VERSION,
    PathAgreement,
    RedundancyResult,
    block_influence_ranking,
    bootstrap_ci,
    path_agreement,
    pruning_path,
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
    "TOKEN_SELECTIONS",
    "AngularDistanceMetric",
    "BlockInfluenceMetric",
    "PathAgreement",
    "RedundancyResult",
    "TokenSelection",
    "block_influence_ranking",
    "bootstrap_ci",
    "path_agreement",
    "pruning_path",
    "select_tokens",
    "spearman_rho",
    "valid_cells",
]
