"""Base classes shared by every normalization layer.

``NormLayer`` owns what all layers have in common: ``num_features``, ``eps``, ``affine``, the
per-channel affine parameters ``weight``/``bias`` of shape ``(C,)`` (``None`` when
``affine=False``), ``reset_parameters()`` and the input checks.

``BatchStatNorm`` adds what layers whose sets include the batch axis have: ``momentum``
(float, or ``None`` for a cumulative average), ``num_batches_tracked``, running buffers
registered with ``_register_running`` (listed by ``running_stat_names``),
``reset_running_stats()``, ``track_running_stats`` (``False``: no running buffers, batch
statistics at inference too; only layers that take the argument, e.g. ``bn``), ``virtual_devices``
(batch statistics per chunk of the batch in training, as DDP processes compute them), and the
``sync_statistics``/``process_group`` attributes read by the functional core.

``ChannelStatisticsMixin`` decides, once per layer, whether the inference statistics are constants
per channel (then the eval forward is one native batch norm, and ``inference_channel_statistics()``
returns them). ``ExampleWeighingMixin`` gives a layer the inference example weighing ``alpha``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as NF


class NormLayer(nn.Module):
    """Base of every normalization layer (a plain ``nn.Module``, never ``_BatchNorm``).

    Args:
        num_features: number of channels ``C`` of an input ``(N, C, *spatial)``.
        eps: added to the variance inside the square root.
        affine: learn a per-channel ``weight`` (init 1) and ``bias`` (init 0).

    Class attributes:
        uses_batch_statistics: a normalization set includes the batch axis (running stats).
        supports_example_weighing: has a settable float ``alpha`` (inference example weighing).
    """

    uses_batch_statistics: bool = False
    supports_example_weighing: bool = False
    #: Constructor arguments a layer keeps under another attribute name (``{argument: attribute}``).
    argument_attributes: dict[str, str] = {}

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}.")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"{type(self).__name__}: eps must be a positive float, got {eps!r}.")
        self.num_features = num_features
        self.eps = float(eps)
        self.affine = bool(affine)
        factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._factory = factory

    def effective_args(self) -> dict[str, Any]:
        """Every constructor argument (``device``/``dtype`` aside) as this layer uses it, in signature order.

        Read from the layer, not from what built it: defaults and values the constructor derives
        are resolved (``gbgn``'s ``channel_groups=None`` reads ``C``, ``ghost``'s default reads
        ``ghost_batch_size=32``). The value of argument ``a`` is the attribute ``a`` (or
        ``argument_attributes[a]``), so a new constructor argument shows here once the layer
        keeps it. The injection summary and the logged hyperparameters show these values.
        """
        skip = {"self", "device", "dtype"}
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        args = {}
        for name, parameter in inspect.signature(type(self).__init__).parameters.items():
            if name in skip or parameter.kind in variadic:
                continue
            attribute = self.argument_attributes.get(name, name)
            if not hasattr(self, attribute):
                raise AttributeError(
                    f"{type(self).__name__} keeps no attribute {attribute!r} for its constructor argument {name!r}; "
                    "store it, or map it in the class's argument_attributes"
                )
            args[name] = getattr(self, attribute)
        return args

    def reset_parameters(self) -> None:
        """Affine to identity (``weight = 1``, ``bias = 0``); subclasses extend."""
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a Tensor, got {type(x).__name__}.")
        if x.dim() < 2 or x.dim() > 5:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (N, C), (N, C, L), (N, C, H, W) or "
                f"(N, C, D, H, W); got {x.dim()}D input of shape {tuple(x.shape)}."
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} was built with num_features={self.num_features} but the "
                f"input has C={x.shape[1]} channels (shape {tuple(x.shape)})."
            )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class BatchStatNorm(NormLayer):
    """Base of layers with running statistics (sets that include the batch axis).

    Args:
        momentum: running-average factor (PyTorch convention), ``None`` = cumulative average.
        track_running_stats: ``False`` registers every running buffer and ``num_batches_tracked``
            as ``None`` (as ``torch.nn.BatchNorm2d`` does); a subclass that passes it normalizes
            with the statistics of the batch at inference too. Subclasses that do not take the
            argument always track.
    Attributes:
        sync_statistics: when True (set by a sync plugin) and ``torch.distributed`` is
            initialized, batch-axis statistics are all-reduced (differentiably) across
            ``process_group`` (``None`` = the world). When True but no process group is
            initialized, the same moments-based path runs on the local batch (a world of one).
    """

    uses_batch_statistics = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
        track_running_stats: bool = True,
        virtual_devices: int = 1,
    ) -> None:
        super().__init__(num_features, eps, affine, device, dtype)
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
            raise ValueError(
                f"{type(self).__name__}: momentum must be in [0, 1] or None (cumulative average), got {momentum!r}."
            )
        if not isinstance(track_running_stats, bool):
            raise ValueError(
                f"{type(self).__name__}: track_running_stats must be True or False, got {track_running_stats!r}."
            )
        if isinstance(virtual_devices, bool) or not isinstance(virtual_devices, int) or virtual_devices < 1:
            raise ValueError(
                f"{type(self).__name__}: virtual_devices (norm.virtual_devices) must be a positive int, "
                f"got {virtual_devices!r}."
            )
        self.momentum = None if momentum is None else float(momentum)
        self.track_running_stats = track_running_stats
        self.virtual_devices = virtual_devices
        self._on_one_device = False  # True while the forward of one virtual device runs
        self.sync_statistics = False
        self.process_group = None
        self._running_inits: dict[str, float] = {}
        counter = torch.tensor(0, dtype=torch.long, device=device) if track_running_stats else None
        self.register_buffer("num_batches_tracked", counter)

    def _register_running(self, name: str, shape, init: float) -> None:
        """Register a running buffer initialised to ``init`` (float32, or the layer's ``dtype``
        when that is float64; float16/bfloat16 layers keep float32 statistics); a ``None`` buffer
        when ``track_running_stats`` is False."""
        if not self.track_running_stats:
            self.register_buffer(name, None)
            return
        device, dtype = self._factory["device"], self._factory["dtype"]
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.register_buffer(name, torch.full(tuple(shape), float(init), dtype=dtype, device=device))
        self._running_inits[name] = float(init)

    @property
    def running_stat_names(self) -> tuple[str, ...]:
        """Names of the running-statistic buffers, in registration order (e.g.
        ``("running_mean", "running_var")``; ``("moving_x", "moving_x2")`` for ``gbgn``).

        Excludes ``num_batches_tracked`` and buffers that are not statistics of the data
        (``brn``'s ``renorm_step``, ``bgn``'s ``trained_spatial_numel``, ``alpha``'s buffer).
        """
        return tuple(self._running_inits)

    def reset_running_stats(self) -> None:
        """Running buffers back to their initial values; ``num_batches_tracked = 0`` (nothing to
        reset when ``track_running_stats`` is False)."""
        for name, init in self._running_inits.items():
            getattr(self, name).fill_(init)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        super().reset_parameters()

    def _momentum_factor(self) -> float:
        """Count one update (training) and return the averaging factor for it (0 in eval and
        without running statistics)."""
        if not self.training or not self.track_running_stats:
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _splits_batch(self, x: Tensor) -> bool:
        """Whether this forward runs per virtual device (:meth:`_forward_per_virtual_device`): in
        training, with ``virtual_devices > 1``, in a layer with batch statistics, and not already
        inside one device's forward.

        Raises:
            ValueError: the batch ``N`` does not split into ``virtual_devices`` equal chunks, or
                ``sync_statistics`` is on (not defined together, see docs/methods.md, "Virtual devices").
        """
        k = self.virtual_devices
        if k == 1 or not self.training or self._on_one_device or not self.uses_batch_statistics:
            return False
        self._check_input(x)
        name = type(self).__name__
        if self.sync_statistics:
            raise ValueError(
                f"{name}: norm.virtual_devices={k} together with synchronized statistics (norm.sync, "
                "trainer.sync_batchnorm or NormSync) is not supported: virtual devices split each process's "
                "batch, sync pools it across processes. Set norm.sync: false or norm.virtual_devices: 1"
            )
        N = x.shape[0]
        if N % k:
            raise ValueError(
                f"{name}: a training batch of N={N} examples does not split into norm.virtual_devices={k} equal "
                f"chunks. Set data.batch_size to a multiple of {k} (with data.drop_last: true when an epoch's last "
                "batch is smaller), or a norm.virtual_devices that divides it."
            )
        return True

    def _forward_per_virtual_device(self, x: Tensor) -> Tensor:
        """The training forward of ``k = virtual_devices`` DDP processes with per-process statistics.

        ``x`` ``(N, C, *)`` is cut into ``k`` consecutive chunks ``(N/k, C, *)``; each runs this
        layer's own forward from the same starting buffers (copies of them), and the outputs are
        concatenated in order, so outputs and gradients are those of the ``k`` processes. Afterwards
        each running statistic (``running_stat_names``) is the mean over the chunks of its updated
        copies, ``(1 - m) r + m mean_j(b_j)`` (the buffers the processes would hold if they averaged
        theirs); the other buffers (``num_batches_tracked``, ``brn``'s ``renorm_step``, ...) end
        as after one forward (every chunk advances them alike from the same start).
        """
        start = {name: buf for name, buf in self._buffers.items() if buf is not None}
        outputs, ends = [], []
        self._on_one_device = True
        try:
            for chunk in x.chunk(self.virtual_devices):
                for name, buf in start.items():
                    self._buffers[name] = buf.clone()
                outputs.append(self.forward(chunk))
                ends.append({name: self._buffers[name] for name in start})
        finally:
            self._on_one_device = False
            self._buffers.update(start)
        statistics = set(self.running_stat_names)
        with torch.no_grad():
            for name, buf in start.items():
                updated = [end[name] for end in ends]
                buf.copy_(torch.stack(updated).mean(0) if name in statistics else updated[-1])
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        untracked = "" if self.track_running_stats else ", track_running_stats=False"
        virtual = "" if self.virtual_devices == 1 else f", virtual_devices={self.virtual_devices}"
        return super().extra_repr() + f", momentum={self.momentum}" + untracked + virtual


class ChannelStatisticsMixin:
    """For a :class:`BatchStatNorm` whose inference statistics can be a mean and a variance per channel
    that no input changes (``bn``, ``brn``, ``ghost``, ``bgn``, ``gbgn``, ``hn``, ``cbn``; list it before
    ``BatchStatNorm`` in the bases).

    The one place that decides it is :meth:`_channel_statistics_obstacle` (``None``: constants per
    channel; else the error message saying which setting makes them depend on the input). Both the
    eval forward (:meth:`_evaluates_by_channel`, then :meth:`_inference_by_channel`: one native eval-mode
    batch norm) and :meth:`inference_channel_statistics` (what ``fold_norms`` folds) read it, so the
    method's functional is called at inference only in the other cases. A subclass writes
    ``_channel_statistics()`` (the ``(C,)`` statistics, read only when there is no obstacle),
    ``_channel_statistics_sources()`` (the buffers they are built from) and, where it has them,
    ``_channel_statistics_obstacle()`` and ``_statistics_parameters()``.
    """

    def _channel_statistics_obstacle(self) -> str | None:
        """``None`` when the inference statistics are constants per channel, else why not (the
        ``ValueError`` message of :meth:`inference_channel_statistics`, naming the setting)."""
        return None

    def _channel_statistics(self) -> tuple[Tensor, Tensor]:
        """The mean and variance per channel ``(C,)``, when :meth:`_channel_statistics_obstacle` is ``None``."""
        raise NotImplementedError

    def _channel_statistics_sources(self) -> tuple[Tensor, ...]:
        """The tensors :meth:`_channel_statistics` reads (the key of the kept statistics)."""
        raise NotImplementedError

    def _statistics_parameters(self) -> tuple[Tensor, ...]:
        """Parameters the inference statistics depend on (``hn``'s std mixture weights): while there are
        any, the eval forward runs the method's functional, which differentiates them."""
        return ()

    def inference_channel_statistics(self) -> tuple[Tensor, Tensor]:
        """The mean and variance per channel ``(C,)`` this layer normalizes with at inference
        (``y = gamma (x - mean) / sqrt(var + eps) + beta``).

        Raises:
            ValueError: the statistics depend on the input (the message names the setting).
        """
        obstacle = self._channel_statistics_obstacle()
        if obstacle is not None:
            raise ValueError(obstacle)
        return self._channel_statistics()

    def _evaluates_by_channel(self) -> bool:
        """Whether this forward is the eval forward of :meth:`_inference_by_channel`: eval mode, statistics
        constant per channel, and no parameter of the statistics to differentiate."""
        # len(): dynamo traces no `not` of a tuple
        return (
            not self.training
            and self._channel_statistics_obstacle() is None
            and len(self._statistics_parameters()) == 0
        )

    def _inference_by_channel(self, x: Tensor) -> Tensor:
        """Eval forward of a layer whose inference statistics are constants per channel: native
        eval-mode batch norm with ``inference_channel_statistics()`` (``(C,)`` each), cast to the
        dtype the input's statistics are computed in.

        The statistics are kept between calls (rebuilding them costs a few small tensor operations)
        and rebuilt when a source buffer's version counter, storage or dtype changes (any in-place
        PyTorch op, ``load_state_dict``, ``.to()``) and at every ``train()``/``eval()`` call. Writes
        that bypass version counters (through ``.data``, or ``torch.distributed`` collectives on the
        buffers) show after the next ``eval()`` call (docs/methods.md, "Inference statistics kept
        between calls"). The cache is built outside inference mode, so a forward that needs
        gradients can follow one under ``torch.inference_mode``; while ``torch.compile`` traces there
        is no cache (the compiled graph computes them).
        """
        if torch.compiler.is_compiling():
            mean, var = self._channel_statistics()
        else:
            key = tuple((t._version, t.data_ptr(), t.dtype) for t in self._channel_statistics_sources())
            cache = self.__dict__.get("_channel_statistics_cache")
            if cache is None or cache[0] != key:
                with torch.inference_mode(False), torch.no_grad():
                    cache = (key, *self._channel_statistics())
                self.__dict__["_channel_statistics_cache"] = cache
            mean, var = cache[1], cache[2]
        dtype = NF.compute_dtype(x.dtype)
        return NF.batch_norm(x, mean.to(dtype), var.to(dtype), self.weight, self.bias, training=False, eps=self.eps)

    def train(self, mode: bool = True):
        """``nn.Module.train``; also drops the kept inference statistics (see ``_inference_by_channel``)."""
        self.__dict__.pop("_channel_statistics_cache", None)
        return super().train(mode)


#: Name of the 0-d float32 buffer that stores ``alpha`` in the module's ``state_dict``.
ALPHA_BUFFER = "example_weighing_alpha"


def _validated_alpha(owner: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{owner}: alpha must be a float in [0, 1] (0 = plain inference), got {value!r}.")
    return float(value)


class ExampleWeighingMixin:
    """A validated float attribute ``alpha`` in [0, 1] (0 = plain inference), persisted in the
    ``state_dict`` as the 0-d float32 buffer ``example_weighing_alpha``.

    At inference the population statistics are mixed with the example's own (docs/methods.md,
    section "Inference example weighing"); ``alpha`` has no effect in training.

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
        self._alpha = _validated_alpha(type(self).__name__, value)
        buf = self._buffers.get(ALPHA_BUFFER)
        if buf is not None:
            with torch.no_grad():
                buf.fill_(self._alpha)

    def _example_weighing_obstacle(self) -> str | None:
        """Why the inference statistics are not constants per channel when ``alpha > 0`` (inference then
        mixes in each example's own statistics); ``None`` when ``alpha = 0``."""
        if self._alpha == 0.0:
            return None
        return (
            f"{type(self).__name__} has alpha={self._alpha} (inference example weighing): its inference "
            "statistics depend on each example; set alpha = 0"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + ALPHA_BUFFER
        if key not in state_dict:  # a checkpoint from before alpha was persisted: keep the current value
            state_dict[key] = self._buffers[ALPHA_BUFFER].detach().clone()
        else:
            try:
                _validated_alpha(type(self).__name__, float(state_dict[key]))
            except ValueError as err:
                error_msgs.append(f"{key}: {err}")
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._alpha = float(self._buffers[ALPHA_BUFFER])
