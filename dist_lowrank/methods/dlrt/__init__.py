"""DLRT: rank-adaptive low-rank training by the matrix-ODE integrators (KLS and the single-pass parallel one)."""
