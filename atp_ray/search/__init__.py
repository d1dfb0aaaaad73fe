"""The search: Ray Tune + Optuna over ATP knobs, to a Pareto front of compressed models.

Modules: ``space`` (search-space YAML), ``objectives`` (what is optimised; Ray-free),
``tuner`` (Tuner, searcher, trainable, resume), ``table`` (the trial table), ``export``;
``front``, ``scheduler`` and ``report`` hold the Pareto front, early stopping and report.
Nothing is imported here, so ``atp_ray.search.objectives`` stays usable without Ray.
"""
