"""Domain data: ``corpora`` and ``quizzes`` (the built-in rows), ``sources`` (where rows come
from), ``formats`` (rows -> prompt/target pairs) and ``batches`` (splits, token blocks and the
seeded batch stream a run reads).
"""
