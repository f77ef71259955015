"""Install krpo-fast.

The top-level ``kernels/`` folder is installed as the subpackage
``krpo_fast.kernels`` so that no top-level module named ``kernels`` is
installed (that name belongs to a PyPI project that transformers probes for).

torch and triton are given as ranges, never pinned: CPU machines install
``torch==2.13.0`` first, GPU images bring their own torch and triton.

Every third-party import of the package is declared here (tests/test_packaging.py
checks): what every command needs in ``install_requires`` (``krpo-fast train``, ``eval``,
``study``), the rest in the extra of the feature that imports it.
"""

from setuptools import find_packages, setup

setup(
    name="krpo-fast",
    version="0.1.0",
    description="Fused Triton kernels and a minimal trainer for KRPO (Kalman-filter GRPO)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["krpo_fast", "krpo_fast.*"]) + ["krpo_fast.kernels"],
    package_dir={"krpo_fast.kernels": "kernels"},
    package_data={"krpo_fast": ["assets/*/*"]},
    install_requires=[
        "torch>=2.6",
        "triton>=3.6",
        "transformers>=4.56",
        "huggingface_hub",  # imported by the CLI (its logging); transformers depends on it too
        "safetensors",
        "tokenizers",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        # krpo-fast study's confidence intervals (the Student-t quantile).
        "scipy",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6"],
        "vllm": ["vllm"],
        "flash": ["flash-attn"],
        "bench": ["pytest-benchmark>=4", "liger-kernel>=0.8", "matplotlib"],
        "trl": ["trl==1.16.*"],
        # verl itself is installed with --no-deps (its pins would replace torch and
        # transformers); these are what its core_algos needs at import time.
        "verl": ["ray>=2.41.0", "tensordict>=0.8.0,<=0.10.0,!=0.9.0", "omegaconf", "codetiming"],
    },
    entry_points={
        "console_scripts": ["krpo-fast=krpo_fast.cli:main"],
        # Importing the module registers the "krpo" estimator and "krpo_fused" loss.
        "verl.plugins": ["krpo = krpo_fast.integrations.verl"],
    },
)
