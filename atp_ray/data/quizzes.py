"""Multiple-choice quizzes built from the offline corpora, with seeded distractors.

Each quiz row has the question's columns, ``choices`` (NUM_CHOICES strings) and ``answer``
(the index of the right one). Distractors, choice order and row order all come from
QUIZ_SEED, so every model on every machine answers the same questions in the same order,
and a ``max_samples`` cap takes the same random sample each time.
"""

from __future__ import annotations

import functools
import random

from atp_ray.data.corpora import Row, hpo_rows, icd10cm_rows

NUM_CHOICES = 4
# Fixed on purpose, not a knob: changing it changes the benchmark.
QUIZ_SEED = 1234


def make_quiz(rows: list[Row], answer_column: str, question_columns: tuple[str, ...], seed: int) -> list[Row]:
    """One question per row: its ``answer_column`` value among NUM_CHOICES - 1 others drawn from the other rows."""
    rng = random.Random(seed)
    pool = sorted({row[answer_column] for row in rows})
    quiz = []
    for row in rows:
        right = row[answer_column]
        choices: list[str] = []
        # Rejection sampling: O(NUM_CHOICES) per row, where filtering the pool would be O(len(pool)).
        while len(choices) < NUM_CHOICES - 1:
            candidate = rng.choice(pool)
            if candidate != right and candidate not in choices:
                choices.append(candidate)
        answer = rng.randrange(NUM_CHOICES)
        choices.insert(answer, right)
        quiz.append({**{c: row[c] for c in question_columns}, "choices": choices, "answer": answer})
    rng.shuffle(quiz)
    return quiz


@functools.cache
def hpo_term_quiz() -> list[Row]:
    """Given an HPO definition, pick its term: columns ``definition``, ``choices``, ``answer``."""
    return make_quiz(hpo_rows(), "term", ("definition",), QUIZ_SEED)


@functools.cache
def icd10cm_chapter_quiz() -> list[Row]:
    """Given an ICD-10-CM code's description, pick its chapter: ``code``, ``description``, ``choices``, ``answer``."""
    return make_quiz(icd10cm_rows(), "chapter", ("code", "description"), QUIZ_SEED)
