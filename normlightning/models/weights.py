"""Pretrained starting points from local files (the task's ``backbone_weights``); nothing is downloaded.

:func:`load_backbone_weights` loads a state_dict into a freshly built backbone, before any norm
injection. ``weights`` is one of:

- a path ending in ``.pt``, ``.pth``, ``.bin`` (``torch.load(weights_only=True)``) or
  ``.safetensors``: a state_dict, or a dict holding one under ``state_dict`` or ``model``. timm's
  own weight files (those ``pretrained_cfg_overlay=dict(file=...)`` names) are of this kind;
- a torchvision weights name for a torchvision backbone (``IMAGENET1K_V1``, ``DEFAULT``,
  ``ResNet18_Weights.IMAGENET1K_V1``): the file torchvision would download, read from the local
  torch hub cache ``<torch.hub.get_dir()>/checkpoints/<file name of the weights' URL>``
  (``$TORCH_HOME/hub/checkpoints/...``).

Rules: every key of the model is loaded from the file with the same shape, except two kinds of
keys whose shape depends on the task and that keep their fresh initialisation, each reported:

- the classifier head: model shape ``(num_classes, *rest)``, file shape ``(M, *rest)``, ``M != num_classes``;
- the input convolution: a 4-D weight of ``input_channels`` input channels where the file has another count.

Any other missing, unexpected or differently shaped key is an error that lists them. The loaded
tensors are marked on their modules (:func:`normlightning.injection.mark_pretrained`), so the norm
injection's summary says which layers started from pretrained statistics.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from normlightning.injection.apply import mark_pretrained

__all__ = [
    "WEIGHT_FILE_SUFFIXES",
    "WeightsReport",
    "load_backbone_weights",
    "read_state_dict",
    "torchvision_weights_file",
]

WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_TORCHVISION_NAME = re.compile(r"([A-Za-z][A-Za-z0-9_]*\.)?[A-Z][A-Z0-9_]*")


@dataclass
class WeightsReport:
    """What :func:`load_backbone_weights` did.

    Attributes:
        source: what was asked for (a path or a torchvision weights name).
        file: the file read.
        loaded: state_dict keys loaded from the file.
        skipped: ``{key: reason}`` of the keys that kept their fresh initialisation.
    """

    source: str
    file: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per skipped key after a headline, e.g. for the log."""
        lines = [
            f"backbone_weights: loaded {len(self.loaded)} tensors from {self.file}"
            + (f" ({self.source})" if self.source != self.file else "")
        ]
        lines += [f"  skipped {key}: {reason}" for key, reason in self.skipped.items()]
        return "\n".join(lines)


def read_state_dict(path: str | os.PathLike) -> Mapping[str, Tensor]:
    """The state_dict in a ``.pt``/``.pth``/``.bin`` or ``.safetensors`` file (on the CPU)."""
    path = Path(path)
    if path.suffix.lower() not in WEIGHT_FILE_SUFFIXES:
        raise ValueError(f"backbone_weights {str(path)!r}: a weights file ends in {', '.join(WEIGHT_FILE_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"backbone_weights file {str(path)!r} does not exist")
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"reading {str(path)!r} needs safetensors: pip install safetensors") from None
        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many kinds; name the file either way
        raise ValueError(f"backbone_weights file {str(path)!r} cannot be read as a state_dict: {err}") from err
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"backbone_weights file {str(path)!r} holds no state_dict (a mapping of names to tensors, or one under "
            f"'state_dict' or 'model'); got {type(obj).__name__}"
        )
    return obj


def torchvision_weights_file(backbone: str, name: str) -> tuple[str, Path]:
    """``(full weights name, local file)`` of the torchvision weights ``name`` of ``backbone``.

    Raises ``FileNotFoundError`` naming the expected file when it is not in the torch hub cache.
    """
    import torchvision

    if backbone not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"backbone_weights={name!r} is a torchvision weights name, but backbone {backbone!r} is not a torchvision "
            f"model; give the path of a weights file ({', '.join(WEIGHT_FILE_SUFFIXES)})"
        )
    enum = torchvision.models.get_model_weights(backbone)
    enum_name, _, member = name.rpartition(".")
    if (enum_name and enum_name != enum.__name__) or member not in enum.__members__:
        raise ValueError(
            f"backbone_weights={name!r} is not a weights name of {backbone}; valid: {', '.join(enum.__members__)} "
            f"(or {enum.__name__}.<name>)"
        )
    weights = enum[member]
    full_name = f"{enum.__name__}.{weights.name}"
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not file.is_file():
        raise FileNotFoundError(
            f"backbone_weights={name!r}: {full_name} is not in the local torch hub cache; expected the file {file} "
            f"(torch.hub.get_dir() = {torch.hub.get_dir()}, set by $TORCH_HOME). normlightning never downloads: put "
            f"the file from {weights.url} there, or set backbone_weights to the path of a weights file"
        )
    return full_name, file


def _resolve(weights: str, backbone: str) -> tuple[str, Path]:
    if Path(weights).suffix.lower() in WEIGHT_FILE_SUFFIXES:
        return weights, Path(weights)
    if _TORCHVISION_NAME.fullmatch(weights):
        return torchvision_weights_file(backbone, weights)
    raise ValueError(
        f"backbone_weights={weights!r}: give the path of a weights file ({', '.join(WEIGHT_FILE_SUFFIXES)}) or, for "
        "a torchvision backbone, a torchvision weights name such as IMAGENET1K_V1"
    )


def _skip_reason(
    key: str, file_shape: torch.Size, model_shape: torch.Size, num_classes: int, input_channels: int | None
) -> str | None:
    """Why a differently shaped key keeps its fresh initialisation, ``None`` when it may not."""
    shapes = f"file {tuple(file_shape)}, model {tuple(model_shape)}"
    if len(model_shape) == len(file_shape) >= 1 and model_shape[0] == num_classes and model_shape[1:] == file_shape[1:]:
        return f"{shapes}: classifier head for num_classes={num_classes}"
    if (
        input_channels is not None
        and len(model_shape) == len(file_shape) == 4
        and model_shape[1] == input_channels
        and model_shape[0] == file_shape[0]
        and model_shape[2:] == file_shape[2:]
    ):
        return f"{shapes}: input convolution for {input_channels} input channels"
    return None


def load_backbone_weights(
    model: nn.Module, weights: str | os.PathLike, *, backbone: str, num_classes: int, input_channels: int | None = None
) -> WeightsReport:
    """Load ``weights`` into ``model`` (the freshly built backbone ``backbone``); see the module docstring.

    Args:
        model: the backbone.
        weights: a weights file path or a torchvision weights name.
        backbone: its registry name (a torchvision weights name needs a torchvision backbone).
        num_classes: the model's classes (a head of another size is skipped).
        input_channels: the model's input channels (an input convolution of another count is skipped).

    Returns:
        The :class:`WeightsReport`.
    """
    source, file = _resolve(os.fspath(weights), backbone)
    state = read_state_dict(file)
    model_state = model.state_dict()
    keep: OrderedDict[str, Tensor] = OrderedDict(state)
    keep._metadata = getattr(state, "_metadata", None)  # BN's version handling
    report = WeightsReport(source=source, file=str(file))
    mismatched = []
    for key, tensor in state.items():
        if key in model_state and tensor.shape != model_state[key].shape:
            reason = _skip_reason(key, tensor.shape, model_state[key].shape, num_classes, input_channels)
            if reason is None:
                mismatched.append(f"{key}: file {tuple(tensor.shape)}, model {tuple(model_state[key].shape)}")
            else:
                report.skipped[key] = reason
                del keep[key]
    if mismatched:
        raise ValueError(
            f"backbone_weights {str(file)!r} does not fit backbone {backbone!r}; shapes differ: {mismatched}"
        )
    result = model.load_state_dict(keep, strict=False)
    missing = [k for k in result.missing_keys if k not in report.skipped]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"backbone_weights {str(file)!r} does not fit backbone {backbone!r}: missing from the file "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)}), not in the model "
            f"{result.unexpected_keys[:10]}{' ...' if len(result.unexpected_keys) > 10 else ''} "
            f"({len(result.unexpected_keys)})"
        )
    report.loaded = [k for k in keep if k in model_state]
    mark_pretrained(model, report.loaded)
    return report
