"""What a training run needs beside its task and callbacks (plain PyTorch, or a Lightning plugin):

- :mod:`.lr_scaling`: linear learning-rate scaling with the batch size;
- :mod:`.piecewise_lr`: :class:`PiecewiseConstantLR`, a schedule with a factor per stage (a config's
  ``lr_scheduler`` class path);
- :mod:`.norm_weight_decay`: weight decay of the norm layers' affine parameters, toward 0 or 1;
- :mod:`.rng_state`: the random-number states a resumed run continues from;
- :mod:`.last_batch`: the setup check that the epoch's last, incomplete batch can be normalized;
- :mod:`.norm_sync`: cross-process batch statistics (``norm.sync``, the :class:`NormSync` plugin).
"""

from normlightning.training.norm_sync import NormSync
from normlightning.training.piecewise_lr import PiecewiseConstantLR

__all__ = ["NormSync", "PiecewiseConstantLR"]
