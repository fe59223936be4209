"""Tests use the library's local multi-process runner (real gloo ranks, timeout, named errors)."""
from dist_lowrank.multiproc import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]
