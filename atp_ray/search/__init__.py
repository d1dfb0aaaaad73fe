"""The search: Ray Tune + Optuna over ATP knobs, to a Pareto front of compressed models.

Ray-free: ``space`` (search-space YAML), ``objectives`` (what is optimised), ``samplers``,
``trial`` (one trial: train, compress, evaluate), ``experiment`` (the experiment folder),
``table`` (the trial table), ``export``, ``front`` (Pareto front, hypervolume) and the report
(``report_data`` prepares, ``report_html`` and ``report_png`` draw, ``report`` writes).
With Ray: ``tuner`` (Tuner, searcher, trainable, resume) and ``scheduler`` (early stopping).
Nothing is imported here, so the Ray-free modules stay usable without Ray.
"""
