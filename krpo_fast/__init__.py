"""krpo-fast: fused Triton kernels and a minimal trainer for KRPO."""

__version__ = "0.1.0"
