"""Cuttlefish (Wang et al. 2023): switch from full rank to factorized layers once every stable rank settles."""
