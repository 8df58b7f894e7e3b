"""blocksparse: 16x16 block-sparse Llama layers with fused LoRA, in Triton.

    from blocksparse import BlockSparseWeight, BlockSparseLinear, block_sparse_linear
"""

from .format import BlockSparseWeight
from .nn import BlockSparseLinear
from .ops import block_sparse_linear

__all__ = ["BlockSparseWeight", "BlockSparseLinear", "block_sparse_linear"]
__version__ = "0.1.0"
