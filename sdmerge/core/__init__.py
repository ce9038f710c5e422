"""The reducer core: grouping -> merge plan -> merge / unmerge. Knows nothing of any model library.

Every tensor is batched: tokens ``x: [B, N, C]``, similarity metric ``[B, N, D]``, per-token
``sizes`` / ``weights`` / ``importance``: ``[B, N]``.
"""

from .agglomerative import LINKAGES, ClusteringMemoryError, agglomerative_clustering, cluster, cosine_distances
from .attention import proportional_attention_bias
from .bipartite import alternating_split, bipartite_soft_matching, random_2d_split
from .crucial import crucial_token_merging
from .grid import window_for_keep_rate, window_groups
from .importance import head_mean_importance_score, importance_score
from .plan import MergePlan, check_keep_rate, plan_from_representatives, tokens_to_remove
from .pruning import evit_fusion, evit_merge, top_k_pruning

__all__ = [
    "LINKAGES",
    "ClusteringMemoryError",
    "MergePlan",
    "agglomerative_clustering",
    "alternating_split",
    "bipartite_soft_matching",
    "check_keep_rate",
    "cluster",
    "cosine_distances",
    "crucial_token_merging",
    "evit_fusion",
    "evit_merge",
    "head_mean_importance_score",
    "importance_score",
    "plan_from_representatives",
    "proportional_attention_bias",
    "random_2d_split",
    "tokens_to_remove",
    "top_k_pruning",
    "window_for_keep_rate",
    "window_groups",
]
