"""Block pruning of decoder models with calibration data.

    from blocksparse.prune import prune_model, PruneOptions
    report = prune_model(model, calib_ids, PruneOptions(sparsity=0.5, method="obc", refine_steps=100))

driver.py runs the layers in sequence; reconstruct.py fits kept weights (and
greedy block OBS); allocation.py decides how much each matrix keeps;
calibration.py collects what reaches each linear; refine.py fits a whole
pruned layer to the dense one. Scores and comparison groups: `blocksparse.masks`.
"""

from .driver import METHODS, RECONSTRUCT_TARGETS, PruneOptions, prune_model

__all__ = ["METHODS", "RECONSTRUCT_TARGETS", "PruneOptions", "prune_model"]
