"""Choosing per-module ranks: allocation of a rank budget (largest remainder) and loss-sensitivity estimates
(Sensitivity-LoRA, arXiv 2509.09119). ARD-LoRA, which learns the ranks while training, is a variant
(``lora_diffusion.variants.ardlora``)."""

from .allocate import allocate_params, allocate_ranks
from .sensitivity import (
    RankSpecFile,
    SensitivityConfig,
    apply_rank_spec,
    combine_scores,
    effective_rank,
    empirical_fisher,
    hutchinson_diagonal,
    load_rank_spec,
    module_metrics,
    rank_spec,
    save_rank_spec,
    sensitivity_ranks,
)

__all__ = ["RankSpecFile", "SensitivityConfig", "allocate_params", "allocate_ranks", "apply_rank_spec",
           "combine_scores", "effective_rank", "empirical_fisher", "hutchinson_diagonal", "load_rank_spec",
           "module_metrics", "rank_spec", "save_rank_spec", "sensitivity_ranks"]
