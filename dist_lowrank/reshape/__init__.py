"""Changes of shape: one description (`change`), shared builders (`builders`), one pipeline (`pipeline`)."""
from dist_lowrank.reshape.change import (Copy, Embed, Factor, Keep, LayerChange, Op, ParamChange, Rotate, ShapeChange,
                                         Slice, state_of, value_of)

__all__ = ["Copy", "Embed", "Factor", "Keep", "LayerChange", "Op", "ParamChange", "Rotate", "ShapeChange", "Slice",
           "state_of", "value_of"]
