"""Tensorized layers (CP, Tucker, TT, TT-matrix) with Bayesian rank pruning (Hawkins, Liu & Zhang)."""
