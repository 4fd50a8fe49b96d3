"""Group counts for injected layers: the ``auto`` rules and fitting a request to one layer.

Pure integer functions.  Used by :class:`~normlightning.callbacks.NormInjection`.

``auto`` rules (``B`` = per-process batch size):

* ``bgn``: the BGN paper's mapping (Zhou et al. 2021, Table 2 / text) from per-GPU batch to
  the number of groups ``G`` of the flattened ``D = C*H*W``::

      B  : 2  4  8  16  32   64  128
      G  : 1  2 16  64 128  256  512

  ``B`` between table entries uses the entry of the largest tabulated batch ``<= B``;
  ``B = 1`` gives 1; ``B > 128`` continues the ``G = 4 B`` trend of the upper rows
  (``4 * p``, ``p`` the largest power of two ``<= B``).  ``G`` is then fitted to each layer
  (largest divisor of ``D`` at or below it), since the request came from the batch, not the layer.
* ``ghost`` (``num_groups`` = ``G_M``, the number of ghost batches): ghost batches of :data:`GHOST_AUTO_SIZE` = 16 examples (Four Things §2 and the
  SeqNorm paper's best ``G_M = 8`` at batch 128): ``G_M`` = largest divisor of ``B`` that is
  ``<= max(1, B // 16)``, so the ghost batches are equal and hold at least 16 examples
  (``B < 32`` gives ``G_M = 1``, i.e. BN).
* ``seqnorm`` (``batch_groups``, ``channel_groups``): ``G_M`` as for ``ghost``; ``G_C`` = :data:`SEQNORM_AUTO_CHANNEL_GROUPS` = 4
  (the paper's best on CIFAR-100 and ImageNet), fitted to ``C`` (largest divisor ``<= 4``).
"""

from __future__ import annotations

from typing import Literal

from normlightning.norms import BGN_PAPER_GROUPS

GHOST_AUTO_SIZE = 16
SEQNORM_AUTO_CHANNEL_GROUPS = 4

FitPolicy = Literal["error", "nearest"]
FIT_POLICIES = ("error", "nearest")


def _check_batch(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"per-process batch size must be a positive int for `auto` group counts, got {batch_size!r}")


def bgn_auto_groups(batch_size: int) -> int:
    """BGN's group count for a per-GPU batch ``batch_size`` (paper mapping, see module doc)."""
    _check_batch(batch_size)
    if batch_size < 2:
        return 1
    p = 1 << (batch_size.bit_length() - 1)  # largest power of two <= B
    if p > 128:
        return 4 * p
    return BGN_PAPER_GROUPS[p]


def ghost_auto_batches(batch_size: int) -> int:
    """Number of ghost batches ``G_M`` for batch ``batch_size``: ghost batches of >= 16 examples."""
    _check_batch(batch_size)
    return largest_divisor_at_most(batch_size, max(1, batch_size // GHOST_AUTO_SIZE))


def largest_divisor_at_most(total: int, limit: int) -> int:
    """The largest ``g`` with ``1 <= g <= limit`` and ``total % g == 0`` (``limit >= 1``, ``total >= 1``)."""
    if total < 1 or limit < 1:
        raise ValueError(f"need total >= 1 and limit >= 1, got total={total}, limit={limit}")
    for g in range(min(limit, total), 0, -1):
        if total % g == 0:
            return g
    return 1  # unreachable: 1 divides everything


def fit_groups(
    requested: int, total: int, *, policy: FitPolicy, layer: str, arg: str, what: str
) -> tuple[int, str | None]:
    """Fit a requested group count to a layer whose grouped size is ``total``.

    Args:
        requested: the configured count (``>= 1``).
        total: the size the groups must divide (``C`` for channel groups, ``D = C*S`` for bgn).
        policy: ``"error"`` raises when ``requested`` does not divide ``total``; ``"nearest"`` takes
            the largest divisor of ``total`` at or below ``requested``.
        layer, arg, what: for messages (module name, argument name, e.g. ``"D = C*H*W = 4096"``).

    Returns:
        ``(groups, note)``; ``note`` is ``None`` when the request fitted as is, else a short
        human-readable account of the change (it goes into the summary table).
    """
    if policy not in FIT_POLICIES:
        raise ValueError(f"norm.group_fit must be one of {FIT_POLICIES}, got {policy!r}")
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
        raise ValueError(f"{arg} for layer {layer!r} must be a positive int or 'auto', got {requested!r}")
    if total % requested == 0:
        return requested, None
    if policy == "error":
        fitted = largest_divisor_at_most(total, requested)
        raise ValueError(
            f"layer {layer!r}: {arg}={requested} does not divide {what}. Set a per-layer override for this "
            f"layer, or norm.group_fit=nearest to use the largest valid count at or below it ({fitted})."
        )
    fitted = largest_divisor_at_most(total, requested)
    return fitted, f"{arg} {requested}->{fitted} (must divide {what})"
