"""Cuttlefish as a Method: stable ranks every cadence, the switch when they settle, Frobenius decay after it."""
from __future__ import annotations

import torch
from torch import nn

from dist_lowrank.errors import ConfigError
from dist_lowrank.layers import frobenius_decay_, frobenius_penalty
from dist_lowrank.methods.cuttlefish.reference import cuttlefish_strategy
from dist_lowrank.methods.switching import SwitchMethod


class CuttlefishMethod(SwitchMethod):
    name = "cuttlefish"

    @classmethod
    def make_rule(cls, cfg, dims):
        return cuttlefish_strategy(cfg.cuttlefish, dims, cfg.min_rank)

    @classmethod
    def check_run(cls, cfg, sharded_parameters: bool) -> None:
        if cfg.cuttlefish.frobenius_decay > 0 and sharded_parameters:
            raise ConfigError("lowrank.cuttlefish.frobenius_decay: not supported with sharded parameters (fsdp2, "
                              "ZeRO-3) yet; allowed there: 0")

    def _decay(self) -> float:
        return self.cfg.cuttlefish.frobenius_decay if self.ranks else 0.0  # after the switch only

    def regularize(self, loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
        decay = self._decay()
        return loss + frobenius_penalty(model, decay) if decay > 0 else loss

    def after_backward(self, model: nn.Module) -> None:
        decay = self._decay()
        if decay > 0:
            frobenius_decay_(model, decay)
