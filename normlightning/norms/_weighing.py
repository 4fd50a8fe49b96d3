"""Mixin for layers with inference example weighing (``alpha``)."""

from __future__ import annotations

import torch

#: Name of the 0-d float32 buffer that stores ``alpha`` in the module's ``state_dict``.
ALPHA_BUFFER = "example_weighing_alpha"


def _validated(owner: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{owner}: alpha must be a float in [0, 1] (0 = plain inference), got {value!r}.")
    return float(value)


class ExampleWeighingMixin:
    """A validated float attribute ``alpha`` in [0, 1] (0 = plain inference), persisted in the
    ``state_dict`` as the 0-d float32 buffer ``example_weighing_alpha``.

    At inference the population statistics are mixed with the example's own (METHODS.md,
    "Inference example weighing"); ``alpha`` has no effect in training.

    ``layer.alpha`` reads a Python float and ``layer.alpha = a`` validates ``a`` and writes the
    buffer in place, so ``Task.load_from_checkpoint`` / ``load_state_dict`` restore it without
    any callback. The forward reads a Python-float copy of the buffer (no device sync, and
    ``torch.compile`` specializes on it); the copy is refreshed by the setter and by
    ``load_state_dict``. A ``state_dict`` without the key (older checkpoints) keeps the current
    value. Write ``alpha`` through the property, not by editing the buffer's data.
    """

    supports_example_weighing = True

    def _init_alpha(self, value, device=None) -> None:
        """Register the buffer (call once in ``__init__``) and set ``alpha = value``."""
        self.register_buffer(ALPHA_BUFFER, torch.zeros((), dtype=torch.float32, device=device))
        self.alpha = value

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = _validated(type(self).__name__, value)
        buf = self._buffers.get(ALPHA_BUFFER)
        if buf is not None:
            with torch.no_grad():
                buf.fill_(self._alpha)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + ALPHA_BUFFER
        if key not in state_dict:  # a checkpoint from before alpha was persisted: keep the current value
            state_dict[key] = self._buffers[ALPHA_BUFFER].detach().clone()
        else:
            try:
                _validated(type(self).__name__, float(state_dict[key]))
            except ValueError as err:
                error_msgs.append(f"{key}: {err}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._alpha = float(self._buffers[ALPHA_BUFFER])
