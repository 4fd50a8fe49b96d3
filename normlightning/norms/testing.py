"""``check_norm_layer(factory, **kwargs)``: the contract every normalization method meets.

Like scikit-learn's ``check_estimator``: it builds layers with ``factory(num_features, **kwargs)``
and checks them against the rules that the rest of normlightning relies on, in this order (each
raises :class:`NormContractError` naming the rule):

1. ``declared properties``: an ``nn.Module`` that :func:`~.model_walk.is_norm_layer` knows, with
   ``num_features``, ``eps`` and ``affine`` as given (the injection passes ``eps`` and ``affine`` to
   every method), per-channel ``weight``/``bias`` of shape ``(C,)`` (``None`` with ``affine=False``),
   a ``bool`` ``uses_batch_statistics``, ``group_args`` that name keywords of the factory; a layer
   with running statistics takes ``momentum`` and has ``running_stat_names`` (floating buffers),
   ``reset_running_stats()`` and ``num_batches_tracked``;
2. ``input shapes``: inputs ``(N, C)`` to ``(N, C, D, H, W)`` (the ranks in the layer's attribute
   ``input_dims``, default ``(2, 3, 4, 5)``; ``in`` declares ``(3, 4, 5)``), in train and eval:
   output of the input's shape and dtype, finite;
3. ``dtypes``: float32 and bfloat16 inputs to a float32 layer (mixed precision) and float64 inputs
   to a float64 layer give outputs of the input's dtype, finite and close to float64's (train and
   eval);
4. ``channels_last``: a channels_last (4-D) / channels_last_3d (5-D) input gives an output in that
   format with the values of the contiguous input's output;
5. ``state_dict round trip``: a new layer that loads a trained layer's ``state_dict`` (strict) has
   the same ``state_dict`` and the same eval outputs;
6. ``eval per example``: in eval, an example's output does not depend on the rest of the batch,
   and an eval forward changes no buffer (except layers with ``track_running_stats=False``);
7. ``running statistics`` (layers that keep them, :func:`~.model_walk.is_batch_statistic_layer`):
   a training forward updates them and counts ``num_batches_tracked``; ``reset_running_stats()``
   restores a new layer's values; with ``momentum=None`` the statistics after ``K`` batches are the
   average of the ``K`` per-batch statistics, each the layer's own statistics of one batch (a
   reset copy with ``momentum=1`` after one forward): what recalibration relies on;
8. ``track_running_stats=False`` (factories that take it, unless they refuse the combination with
   ``kwargs`` by a ``ValueError`` naming ``track_running_stats``): no running buffers, not a layer that
   recalibration touches, eval normalizes with the batch's statistics (eval output = train output),
   a forward changes no buffer;
9. ``eval gradients``: in eval, the input gradient is finite and non-zero (adversarial attacks);
10. ``inference channel statistics``: where a layer reports constant statistics per channel
    (``inference_channel_statistics()``, what the injection's ``fold_norms`` folds into the
    convolution before it; a ``ValueError`` says there are none in this setting), its eval output
    is ``gamma_c (x - mean_c) / sqrt(var_c + eps) + beta_c`` with them;
11. ``gradcheck``: ``torch.autograd.gradcheck`` of the training forward in float64 on a small
    input, with respect to the input and every parameter.

Inputs have a batch of 8 and ``num_features=4`` channels by default, so group counts in
``kwargs`` must fit ``C = 4`` and a batch of 8 (gradcheck: 4). See docs/methods.md, "Adding a
method".
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .group_args import group_args_of
from .model_walk import is_batch_statistic_layer, is_norm_layer
from .registry import factory_accepts, norm_factory

__all__ = ["DEFAULT_INPUT_DIMS", "NormContractError", "check_norm_layer"]

#: Input ranks a layer takes unless its class declares ``input_dims``: ``(N, C)`` to ``(N, C, D, H, W)``.
DEFAULT_INPUT_DIMS = (2, 3, 4, 5)
#: Spatial sizes of the inputs by rank (distinct sizes catch a transposed axis).
_SPATIAL = {2: (), 3: (3,), 4: (3, 2), 5: (2, 3, 2)}
_BATCH = 8
#: (atol, rtol) of a float32 layer's output for an input of each dtype against the float64 layer's.
_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-1, 5e-2)}


class NormContractError(AssertionError):
    """A layer breaks a rule of the contract; ``rule`` names it (see the module docstring)."""

    def __init__(self, owner: str, rule: str, detail: str) -> None:
        super().__init__(f"check_norm_layer({owner}): rule '{rule}' broken: {detail}")
        self.rule = rule


class _Checker:
    """Builds layers with ``factory(num_features, **kwargs)`` and runs the rules in order."""

    def __init__(self, factory: Callable[..., nn.Module], num_features: int, kwargs: dict[str, Any]) -> None:
        self.factory, self.num_features, self.kwargs = factory, num_features, kwargs
        self.owner = getattr(factory, "__name__", type(factory).__name__)
        self.rule = ""
        #: the input ranks the layer declares (read by ``declared_properties``)
        self.dims = DEFAULT_INPUT_DIMS

    @contextmanager
    def checking(self, rule: str) -> Iterator[None]:
        """Any exception inside the block (but a :class:`NormContractError`) breaks ``rule``."""
        self.rule = rule
        try:
            yield
        except NormContractError:
            raise
        except Exception as err:
            raise NormContractError(self.owner, rule, f"{type(err).__name__}: {err}") from err

    def require(self, condition: bool, detail: str) -> None:
        if not condition:
            raise NormContractError(self.owner, self.rule, detail)

    def close(self, actual: Tensor, expected: Tensor, what: str, atol: float = 1e-6, rtol: float = 1e-5) -> None:
        actual, expected = actual.detach().double(), expected.detach().double()
        self.require(
            actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        )
        if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
            worst = (actual - expected).abs().max().item()
            self.require(False, f"{what}: differs by up to {worst:.3g} (atol {atol}, rtol {rtol})")

    # ------------------------------------------------------------------------------ builders
    def build(self, dtype: torch.dtype = torch.float32, **extra: Any) -> nn.Module:
        layer = self.factory(self.num_features, **{**self.kwargs, **extra})
        return layer.to(dtype)

    def input(self, dims: int, dtype: torch.dtype = torch.float64, batch: int = _BATCH, seed: int = 0) -> Tensor:
        """``(batch, C, *spatial)`` with a different mean and scale per channel."""
        generator = torch.Generator().manual_seed(seed)
        shape = (batch, self.num_features, *_SPATIAL[dims])
        scale = torch.linspace(0.5, 2.0, self.num_features, dtype=torch.float64).view(1, -1, *([1] * (dims - 2)))
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + scale - 1.0 + 0.3 * seed
        return x.to(dtype)

    def trained(self, dtype: torch.dtype = torch.float64, **extra: Any) -> nn.Module:
        """A layer with perturbed parameters after two training forwards (running statistics set)."""
        generator = torch.Generator().manual_seed(0)
        layer = self.build(dtype, **extra).train()
        with torch.no_grad():
            for parameter in layer.parameters():
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                parameter.add_(0.2 * noise.to(parameter.dtype))
            for seed in (1, 2):
                layer(self.input(self.dims[-1], dtype, seed=seed))
        return layer

    def forward(self, layer: nn.Module, x: Tensor, what: str) -> Tensor:
        y = layer(x)
        self.require(isinstance(y, Tensor), f"{what}: returned a {type(y).__name__}, not a Tensor")
        self.require(y.shape == x.shape, f"{what}: output shape {tuple(y.shape)} for input shape {tuple(x.shape)}")
        self.require(y.dtype == x.dtype, f"{what}: output dtype {y.dtype} for a {x.dtype} input")
        self.require(bool(torch.isfinite(y).all()), f"{what}: output has NaN or inf")
        return y

    # --------------------------------------------------------------------------------- rules
    def declared_properties(self) -> None:
        with self.checking("declared properties"):
            C = self.num_features
            layer = self.build(eps=1e-3, affine=False)
            self.require(
                isinstance(layer, nn.Module), f"the factory returned a {type(layer).__name__}, not an nn.Module"
            )
            self.require(
                is_norm_layer(layer),
                "not a normalization layer: subclass NormLayer or declare the class "
                "attribute uses_batch_statistics (bool)",
            )
            self.require(getattr(layer, "num_features", None) == C, f"num_features is not {C}")
            self.require(getattr(layer, "eps", None) == 1e-3, "eps=1e-3 given, layer.eps is not 1e-3")
            self.require(
                getattr(layer, "weight", 0) is None and getattr(layer, "bias", 0) is None,
                "affine=False given: weight and bias must be None",
            )
            layer = self.build(affine=True)
            for name in ("weight", "bias"):
                value = getattr(layer, name, None)
                self.require(
                    isinstance(value, nn.Parameter) and value.shape == (C,),
                    f"affine=True: {name} must be a Parameter of shape ({C},)",
                )
            self.require(
                isinstance(getattr(layer, "uses_batch_statistics", None), bool), "uses_batch_statistics is not a bool"
            )
            self.dims = tuple(sorted(getattr(layer, "input_dims", DEFAULT_INPUT_DIMS)))
            self.require(
                len(self.dims) > 0 and set(self.dims) <= set(DEFAULT_INPUT_DIMS),
                f"input_dims={self.dims}: must be ranks among {DEFAULT_INPUT_DIMS}",
            )
            for arg in group_args_of(self.factory):
                self.require(
                    factory_accepts(self.factory, arg.name),
                    f"group_args names {arg.name!r}, not a keyword of the factory",
                )
            if not layer.uses_batch_statistics or getattr(layer, "track_running_stats", True) is False:
                return
            self.require(factory_accepts(self.factory, "momentum"), "a layer with running statistics takes momentum")
            self.require(self.build(momentum=0.25).momentum == 0.25, "momentum=0.25 given, layer.momentum is not 0.25")
            for name in ("reset_running_stats", "running_stat_names", "num_batches_tracked"):
                self.require(hasattr(layer, name), f"a layer with running statistics has {name}")
            buffers = dict(layer.named_buffers())
            for name in layer.running_stat_names:
                self.require(
                    name in buffers and buffers[name].is_floating_point(),
                    f"running_stat_names lists {name!r}, not a floating buffer",
                )

    def input_shapes(self) -> None:
        with self.checking("input shapes"):
            layer = self.build(torch.float64)
            for dims in self.dims:
                for training in (True, False):
                    self.forward(layer.train(training), self.input(dims), f"{dims}-D input, training={training}")

    def dtypes(self) -> None:
        with self.checking("dtypes"):
            reference = self.trained()
            x = self.input(self.dims[-1], seed=3)
            for training in (True, False):
                expected = self.forward(copy.deepcopy(reference).train(training), x, f"float64, training={training}")
                for dtype, (atol, rtol) in _TOLERANCE.items():
                    layer = copy.deepcopy(reference).float().train(training)
                    what = f"{dtype} input to a float32 layer, training={training}"
                    y = self.forward(layer, x.to(dtype), what)
                    self.close(y, expected, f"{what}: output against float64's", atol, rtol)

    def channels_last(self) -> None:
        with self.checking("channels_last"):
            formats = {4: torch.channels_last, 5: torch.channels_last_3d}
            for dims in (d for d in self.dims if d in formats):
                reference = self.trained()
                x = self.input(dims, seed=3)
                for training in (True, False):
                    expected = copy.deepcopy(reference).train(training)(x)
                    strided = x.contiguous(memory_format=formats[dims])
                    y = self.forward(copy.deepcopy(reference).train(training), strided, f"{formats[dims]}")
                    self.require(
                        y.is_contiguous(memory_format=formats[dims]),
                        f"{dims}-D {formats[dims]} input, training={training}: output not in that format",
                    )
                    self.close(y, expected, f"{formats[dims]} output against a contiguous input's, training={training}")

    def state_dict_round_trip(self) -> None:
        with self.checking("state_dict round trip"):
            trained = self.trained().eval()
            fresh = self.build(torch.float64)
            fresh.load_state_dict(trained.state_dict())
            fresh.eval()
            saved, loaded = trained.state_dict(), fresh.state_dict()
            self.require(saved.keys() == loaded.keys(), "the loaded layer's state_dict has other keys")
            for key, value in saved.items():
                self.require(torch.equal(value, loaded[key]), f"{key} differs after loading")
            x = self.input(self.dims[-1], seed=4)
            self.close(fresh(x), trained(x), "eval output of a layer loaded from the state_dict")

    def eval_per_example(self) -> None:
        layer = self.trained().eval()
        if getattr(layer, "track_running_stats", True) is False:
            return
        with self.checking("eval per example"):
            before = {k: v.clone() for k, v in layer.state_dict().items()}
            x = self.input(self.dims[-1], seed=5)
            self.close(layer(x)[:2], layer(x[:2]), "eval output of 2 examples alone against within the batch of 8")
            for key, value in layer.state_dict().items():
                self.require(torch.equal(value, before[key]), f"an eval forward changed the buffer {key}")

    def running_statistics(self) -> None:
        layer = self.trained()
        if not is_batch_statistic_layer(layer):
            return
        with self.checking("running statistics"):
            names = layer.running_stat_names
            self.require(len(names) > 0, "running_stat_names is empty for a layer with running statistics")
            initial = {name: getattr(self.build(torch.float64), name) for name in names}
            batches = [self.input(self.dims[-1], seed=seed) * (1 + seed) for seed in (6, 7, 8)]
            counted = int(layer.num_batches_tracked)
            before = {name: getattr(layer, name).clone() for name in names}
            layer.train()(batches[0])
            self.require(
                int(layer.num_batches_tracked) == counted + 1, "a training forward does not count num_batches_tracked"
            )
            self.require(
                any(not torch.equal(getattr(layer, n), before[n]) for n in names),
                "a training forward changes none of the running statistics",
            )
            layer.reset_running_stats()
            self.require(int(layer.num_batches_tracked) == 0, "reset_running_stats() leaves num_batches_tracked != 0")
            for name in names:
                self.close(
                    getattr(layer, name), initial[name], f"{name} after reset_running_stats() against a new layer's"
                )
            per_batch = []
            for x in batches:
                probe = copy.deepcopy(layer)
                probe.momentum = 1.0
                probe(x)
                per_batch.append({name: getattr(probe, name) for name in names})
            layer.momentum = None  # what recalibration sets: the cumulative average
            for x in batches:
                layer(x)
            for name in names:
                average = torch.stack([stats[name] for stats in per_batch]).mean(0)
                self.close(
                    getattr(layer, name),
                    average,
                    f"{name} with momentum=None after {len(batches)} batches against the average of the "
                    "per-batch statistics (cumulative average)",
                )

    def untracked(self) -> None:
        if not factory_accepts(self.factory, "track_running_stats"):
            return
        with self.checking("track_running_stats=False"):
            try:
                layer = self.build(torch.float64, track_running_stats=False)
            except ValueError as err:  # a clear refusal of this combination of settings
                if "track_running_stats" in str(err):
                    return
                raise
            self.require(getattr(layer, "track_running_stats", None) is False, "layer.track_running_stats is not False")
            self.require(tuple(getattr(layer, "running_stat_names", ())) == (), "running_stat_names is not empty")
            self.require(getattr(layer, "num_batches_tracked", None) is None, "num_batches_tracked is not None")
            self.require(
                not is_batch_statistic_layer(layer), "recalibration would treat it as keeping running statistics"
            )
            before = {k: v.clone() for k, v in layer.state_dict().items()}
            x = self.input(self.dims[-1], seed=9)
            self.close(layer.eval()(x), layer.train()(x), "eval output against the training output (batch statistics)")
            for key, value in layer.state_dict().items():
                self.require(torch.equal(value, before[key]), f"a forward changed the buffer {key}")

    def eval_gradients(self) -> None:
        with self.checking("eval gradients"):
            layer = self.trained().eval()
            x = self.input(self.dims[-1], seed=10).requires_grad_(True)
            weights = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(11))
            (layer(x) * weights).sum().backward()
            self.require(x.grad is not None, "the eval output does not depend on the input in autograd")
            self.require(bool(torch.isfinite(x.grad).all()), "the eval input gradient is not finite")
            self.require(bool(x.grad.abs().sum() > 0), "the eval input gradient is zero")

    def inference_channel_statistics(self) -> None:
        layer = self.trained().eval()
        if not hasattr(layer, "inference_channel_statistics"):
            return
        with self.checking("inference channel statistics"):
            try:
                mean, var = layer.inference_channel_statistics()
            except ValueError:  # the layer says its statistics are not constants per channel in this setting
                return
            C = self.num_features
            self.require(mean.shape == (C,) and var.shape == (C,), f"mean and variance must have shape ({C},)")
            x = self.input(self.dims[-1], seed=12)
            view = (1, -1) + (1,) * (x.dim() - 2)
            weight = torch.ones(C, dtype=x.dtype) if layer.weight is None else layer.weight.detach()
            bias = torch.zeros(C, dtype=x.dtype) if layer.bias is None else layer.bias.detach()
            scale = weight / torch.sqrt(var.detach().to(x.dtype) + layer.eps)
            expected = (x - mean.detach().to(x.dtype).view(view)) * scale.view(view) + bias.view(view)
            self.close(layer(x), expected, "eval output against gamma_c (x - mean_c) / sqrt(var_c + eps) + beta_c")

    def gradcheck(self) -> None:
        with self.checking("gradcheck"):
            layer = self.trained().train()
            x = self.input(min(self.dims[-1], 4), batch=4, seed=13).requires_grad_(True)
            names = [name for name, _ in layer.named_parameters()]
            parameters = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]

            def function(x: Tensor, *values: Tensor) -> Tensor:
                # every evaluation starts from the same state: a layer whose training forward advances its
                # own buffers (brn's ramp step, mabn's windows) defines one function per state
                return torch.func.functional_call(copy.deepcopy(layer), dict(zip(names, values)), (x,))

            torch.autograd.gradcheck(function, (x, *parameters), eps=1e-6, atol=1e-5, rtol=1e-4)

    def run(self) -> None:
        self.declared_properties()
        self.input_shapes()
        self.dtypes()
        self.channels_last()
        self.state_dict_round_trip()
        self.eval_per_example()
        self.running_statistics()
        self.untracked()
        self.eval_gradients()
        self.inference_channel_statistics()
        self.gradcheck()


def check_norm_layer(factory: Callable[..., nn.Module] | str, num_features: int = 4, **kwargs: Any) -> None:
    """Check the layers ``factory(num_features, **kwargs)`` against the contract of every method.

    Args:
        factory: a layer class or factory ``factory(num_features, **kwargs) -> nn.Module``, or a
            registry name (``"bgn"``, an installed plugin's name).
        num_features: channels ``C`` of the test inputs.
        **kwargs: the layer's arguments; group counts must fit ``C`` and a batch of 4
            (e.g. ``num_groups=2``).

    Raises:
        NormContractError: (an ``AssertionError``) naming the first rule broken (module docstring).
    """
    if isinstance(factory, str):
        factory = norm_factory(factory)
    _Checker(factory, num_features, kwargs).run()
