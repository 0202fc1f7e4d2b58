"""Evaluation: does a selection train a better student? ``students`` evaluates a model on held-out rows with
plain forward passes and greedy ``generate`` (nothing from the scoring engine); ``compare`` trains one student
per selection strategy and seed and writes the comparison (``air-ray compare``).

May import: ``air_ray.errors``, ``fsio``, ``config``, ``data``, ``models``, ``store``, ``outputs`` (select),
``training`` (the students). Never ``engine`` or ``heads`` (the evaluation must not share the scorer's code) and
never Ray.
"""
