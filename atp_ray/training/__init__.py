"""The recipe: ``atp`` (the training loop), ``mask_sources`` (one mask source per method),
``budget`` (the sparsity budget controller), ``distillation``, ``strategy`` (the config's
strategy), ``memory_plan`` (what fits on a GPU) and ``distributed`` (the recipe on Ray Train).
"""
