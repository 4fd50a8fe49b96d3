"""PredictionWriter: ``normlightning predict`` writes its predictions to a file (the ``predictions:`` section).

A Lightning ``BasePredictionWriter``: it collects each predicted batch and, at the end of the
prediction epoch, writes into the run's log folder (``trainer.log_dir``, e.g.
``runs/quickstart/version_3/``; ``output_dir`` to choose another) and prints the path:

- ``predictions.csv`` (``format: csv``, the default), one row per input::

      index,target,target_name,predicted_class,predicted_name,top1_class,top1_name,top1_prob,...

  ``index`` is the example's index in the prediction dataset (the test split for normlightning's
  DataModules), or ``path`` instead: the image file relative to ``data.predict_root`` when the
  prediction dataset names its files (its ``relative_paths``,
  :class:`~normlightning.data.image_files.ImageFiles`); ``target`` its label when the batches
  carry one (``(x, y)`` batches), ``predicted_class`` the argmax, then the ``top_k`` most probable
  classes with their probabilities, most probable first. The ``*_name`` columns appear when the
  data module has ``class_names`` (one per class);
- ``predictions.pt`` (``format: pt``): ``{"index": (N,), "probabilities": (N, C), "target": (N,),
  "paths": [N], "class_names": [C]}`` (``target`` only with labelled batches, ``paths`` and
  ``class_names`` only where the CSV has them), the full tensors for ``torch.load``;
- both with ``format: both``; nothing with ``format: none``.

The task's ``predict_step`` must return one row of class probabilities per input, ``(N, C)``
(:class:`~normlightning.tasks.ClassificationTask` returns ``softmax(logits)``). Under DDP each
process writes its own share (``predictions_rank<r>.csv``; Lightning's distributed sampler may
repeat a few examples to even out the shares).

Before the prediction pass (``on_predict_start``) the writer creates the folder, checks that it
can write there, and refuses to replace an existing file of the same name (an earlier
prediction into the same ``output_dir``): it raises, naming ``predictions.output_dir`` and
``predictions.filename``, unless ``overwrite: true``. It refuses rather than picking a new name,
so that the path a script reads always holds the predictions of the command that names it.
"""

from __future__ import annotations

import csv
import os
import tempfile
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

__all__ = ["PredictionWriter", "csv_columns"]


def csv_columns(top_k: int, with_target: bool, with_names: bool = False, with_paths: bool = False) -> list[str]:
    """Header of ``predictions.csv`` for ``top_k`` classes (``with_target``: a ``target`` column;
    ``with_names``: a ``*_name`` column after each class column; ``with_paths``: ``path`` instead of ``index``)."""

    def name(prefix: str) -> list[str]:
        return [f"{prefix}_name"] if with_names else []

    ranked = [column for i in range(1, top_k + 1) for column in (f"top{i}_class", *name(f"top{i}"), f"top{i}_prob")]
    target = ["target", *name("target")] if with_target else []
    return ["path" if with_paths else "index", *target, "predicted_class", *name("predicted"), *ranked]


def _prediction_paths(trainer: Trainer) -> list[str] | None:
    """The file of each example of the prediction dataset (its ``relative_paths``), ``None`` if it names none."""
    loaders = trainer.predict_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    return getattr(getattr(loader, "dataset", None), "relative_paths", None)


def _class_names(trainer: Trainer, num_classes: int) -> list[str] | None:
    """The data module's ``class_names`` (``None`` if it has none); their number must be ``num_classes``."""
    names = getattr(trainer.datamodule, "class_names", None)
    if names is None:
        return None
    if len(names) != num_classes:
        raise ValueError(
            f"PredictionWriter: the data module's class_names has {len(names)} names but the model predicts "
            f"{num_classes} classes; give the data module one name per class (or none)"
        )
    return [str(name) for name in names]


def _batch_target(batch: Any, size: int) -> Tensor | None:
    """The labels ``(N,)`` of an ``(x, y, ...)`` batch, ``None`` when it carries none."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        y = batch[1]
        if y.dim() == 1 and y.shape[0] == size and not y.is_floating_point():
            return y.detach().cpu()
    return None


class PredictionWriter(BasePredictionWriter):
    """Write the predictions of ``trainer.predict`` to ``predictions.csv`` and/or ``predictions.pt``.

    Args:
        format: ``csv`` (one row per input: index, target, predicted class, top-k classes and
            probabilities), ``pt`` (the full tensors), ``both``, or ``none`` (write nothing, e.g. for a
            task whose ``predict_step`` returns something else).
        top_k: classes listed per row of the CSV (at most the number of classes).
        output_dir: folder of the files; default the run's log folder (``trainer.log_dir``).
        filename: file name without extension.
        overwrite: replace files of the same name in the folder (default: refuse before predicting).

    After a prediction run, :attr:`files` holds the paths written.
    """

    def __init__(
        self,
        format: Literal["csv", "pt", "both", "none"] = "csv",
        top_k: int = 5,
        output_dir: str | None = None,
        filename: str = "predictions",
        overwrite: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        if format not in ("csv", "pt", "both", "none"):
            raise ValueError(f"predictions.format must be 'csv', 'pt', 'both' or 'none', got {format!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"predictions.top_k must be a positive int, got {top_k!r}")
        if not filename or os.sep in filename:
            raise ValueError(f"predictions.filename must be a plain file name without folders, got {filename!r}")
        self.format = format
        self.top_k = top_k
        self.output_dir = output_dir
        self.filename = filename
        self.overwrite = overwrite
        self.files: list[str] = []
        self._reset()

    def _reset(self) -> None:
        self._indices: list[Tensor] = []
        self._probabilities: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._seen = 0

    def _folder(self, trainer: Trainer) -> str:
        return self.output_dir or trainer.log_dir or trainer.default_root_dir

    def _paths(self, trainer: Trainer) -> list[str]:
        """The files this process writes."""
        stem = self.filename if trainer.world_size == 1 else f"{self.filename}_rank{trainer.global_rank}"
        extensions = {"csv": ["csv"], "pt": ["pt"], "both": ["csv", "pt"], "none": []}[self.format]
        return [os.path.join(self._folder(trainer), f"{stem}.{extension}") for extension in extensions]

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Before the pass: create the folder, check that it is writable and that no earlier
        predictions would be replaced (see the module docstring)."""
        if self.format == "none":
            return
        folder = self._folder(trainer)
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise OSError(
                f"PredictionWriter: cannot write predictions into {folder} ({err.strerror or err}); set "
                f"predictions.output_dir to a writable folder"
            ) from err
        existing = [path for path in self._paths(trainer) if os.path.exists(path)]
        if existing and not self.overwrite:
            raise FileExistsError(
                f"PredictionWriter: {', '.join(existing)} already exists (earlier predictions); set another "
                f"predictions.output_dir or predictions.filename, or predictions.overwrite=true to replace it"
            )

    @override
    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()
        self.files = []

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Keep one batch: its dataset indices, its probabilities ``(N, C)`` and its labels."""
        if self.format == "none":
            return
        if not isinstance(prediction, Tensor) or prediction.dim() != 2 or not prediction.is_floating_point():
            shape = tuple(prediction.shape) if isinstance(prediction, Tensor) else type(prediction).__name__
            raise ValueError(
                f"PredictionWriter: predict_step must return class probabilities of shape (N, num_classes), got "
                f"{shape}; return them from your task's predict_step, or set predictions.format=none to write no file"
            )
        size = prediction.shape[0]
        if batch_indices is not None and len(batch_indices) == size:
            indices = torch.as_tensor(list(batch_indices), dtype=torch.long)
        else:  # the loader has no sampler Lightning can track (e.g. an IterableDataset): count
            indices = torch.arange(self._seen, self._seen + size)
        self._seen += size
        target = _batch_target(batch, size)
        if self._probabilities and (target is None) != (not self._targets):
            raise ValueError("PredictionWriter: some prediction batches carry labels and others do not")
        self._indices.append(indices)
        self._probabilities.append(prediction.detach().float().cpu())
        if target is not None:
            self._targets.append(target)

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the files of this process and print where they are."""
        if self.format == "none":
            return
        if not self._probabilities:
            rank_zero_info("PredictionWriter: the prediction loader yielded no batch; nothing written")
            return
        folder = self._folder(trainer)
        index = torch.cat(self._indices)
        probabilities = torch.cat(self._probabilities)
        target = torch.cat(self._targets) if self._targets else None
        all_paths = _prediction_paths(trainer)
        paths = [all_paths[i] for i in index.tolist()] if all_paths is not None else None
        names = _class_names(trainer, probabilities.shape[1])
        for path in self._paths(trainer):
            if path.endswith(".csv"):
                self.files.append(self._write_csv(path, index, probabilities, target, paths, names))
            else:
                tensors: dict[str, Any] = {"index": index, "probabilities": probabilities}
                if target is not None:
                    tensors["target"] = target
                if paths is not None:
                    tensors["paths"] = paths
                if names is not None:
                    tensors["class_names"] = names
                torch.save(tensors, path)
                self.files.append(path)
        shares = "" if trainer.world_size == 1 else f" (this process's share; one file per process in {folder})"
        rank_zero_info(f"PredictionWriter: {len(index)} predictions written to {', '.join(self.files)}{shares}")
        self._reset()

    def _write_csv(
        self,
        path: str,
        index: Tensor,
        probabilities: Tensor,
        target: Tensor | None,
        paths: list[str] | None,
        names: list[str] | None,
    ) -> str:
        """One row per input (see the module docstring); ``paths`` replace ``index``, ``names`` add the name columns."""
        k = min(self.top_k, probabilities.shape[1])
        top_prob, top_class = probabilities.topk(k, dim=1)

        def named(label: int) -> list[Any]:
            return [label, names[label]] if names is not None else [label]

        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(csv_columns(k, target is not None, names is not None, paths is not None))
            for row in range(len(index)):
                pairs = zip(top_class[row].tolist(), top_prob[row].tolist())
                ranked = [v for c, p in pairs for v in (*named(c), f"{p:.6g}")]
                labels = named(int(target[row])) if target is not None else []
                first = paths[row] if paths is not None else int(index[row])
                writer.writerow([first, *labels, *named(int(top_class[row, 0])), *ranked])
        return path
