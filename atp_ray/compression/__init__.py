"""From a pruned, LoRA-tuned run to a smaller dense model: ``compress`` (the compressed
folder), ``surgery`` (slicing weights by the hard mask) and ``speed`` (how fast a model runs).
"""
