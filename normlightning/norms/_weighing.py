"""Mixin for layers with inference example weighing (``alpha``)."""

from __future__ import annotations


class ExampleWeighingMixin:
    """A validated float attribute ``alpha`` in [0, 1] (0 = plain inference).

    At inference the population statistics are mixed with the example's own (METHODS.md,
    "Inference example weighing"); ``alpha`` has no effect in training.
    """

    supports_example_weighing = True

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{type(self).__name__}: alpha must be a float in [0, 1] (0 = plain inference), got {value!r}.")
        self._alpha = float(value)
