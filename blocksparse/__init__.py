"""blocksparse: 16x16 block-sparse Llama layers with fused LoRA, in Triton.

    from blocksparse import BlockSparseWeight, BlockSparseLinear, block_sparse_linear
    from blocksparse import sparsify_model, densify_model
"""

from .format import BlockSparseWeight
from .nn import BlockSparseLinear
from .ops import block_sparse_linear
from .sparsify import densify_model, replace_module, sparsify_model

__all__ = ["BlockSparseWeight", "BlockSparseLinear", "block_sparse_linear", "densify_model",
           "replace_module", "sparsify_model"]
__version__ = "0.1.0"
