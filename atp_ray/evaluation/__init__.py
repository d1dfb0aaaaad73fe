"""Measuring models: ``evaluate`` (perplexity, multiple-choice accuracy), ``tasks`` (task
configs and their scores), ``targets`` (what is evaluated: a run, its compressed model, the
base) and ``eval_recipe`` (``atp-ray eval``).
"""
