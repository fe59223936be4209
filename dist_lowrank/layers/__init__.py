"""Factorized modules every method shares: low-rank Linear/Conv2d (HF Conv1D too), Frobenius decay, shape helpers.
A method's own layers live in its folder (InRank's: methods/inrank/layer.py)."""
from dist_lowrank.layers.decay import factor_pairs, frobenius_decay_, frobenius_penalty
from dist_lowrank.layers.lowrank import LowRankConv2d, LowRankLinear, build_factorized, empty_factorized
from dist_lowrank.layers.shapes import (is_factorizable, is_hf_conv1d, matrix_dims, max_saving_rank,
                                        saves_parameters, weight_matrix)


__all__ = ["LowRankLinear", "LowRankConv2d", "build_factorized",
           "empty_factorized", "factor_pairs", "frobenius_decay_", "frobenius_penalty", "weight_matrix",
           "matrix_dims", "is_factorizable", "is_hf_conv1d", "saves_parameters", "max_saving_rank"]

