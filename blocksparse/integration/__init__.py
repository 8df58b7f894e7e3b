"""Glue to Hugging Face transformers / PEFT / datasets, the default model and corpus.

Submodules import their heavy dependencies themselves, so `import
blocksparse.integration` stays light.
"""

from .sparsify import LLAMA_TARGET_MODULES, densify_model, sparsify_model, target_linears

__all__ = ["LLAMA_TARGET_MODULES", "densify_model", "sparsify_model", "target_linears"]
