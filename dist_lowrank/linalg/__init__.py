"""Pure math on tensors (no torch.distributed): stable rank, Krylov σ_max, explained variance, truncated SVD."""
from dist_lowrank.linalg.explained import explained_ratio, explained_variance_rank
from dist_lowrank.linalg.krylov import sigma_max_batched, sigma_max_gram, start_vector
from dist_lowrank.linalg.stable_rank import SrankResult, as_matrix, stable_rank
from dist_lowrank.linalg.svd import truncated_svd_factors

__all__ = ["SrankResult", "as_matrix", "stable_rank", "sigma_max_batched", "sigma_max_gram", "start_vector", "explained_ratio",
           "explained_variance_rank", "truncated_svd_factors"]
