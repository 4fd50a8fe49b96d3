"""FewShotTask: base-class training with a cosine classifier, imprinted-weight episodes for val/test.

Imprinted weights (Qi, Brown & Lowe 2018) trained as Gidaris & Komodakis (2018): each validation
or test batch is one N-way K-shot episode; class weights are the normalized mean support
embeddings and queries go to the nearest weight by cosine. Norm statistics in episodes are
``eval`` or ``transductive``. The method, the metrics and the DDP behaviour are described in
``docs/few_shot.md``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from normlightning.data.episodes import split_episode
from normlightning.evaluation.confidence_interval import mean_confidence_interval
from normlightning.models.cosine_classifier import CosineClassifier, cosine_logits, imprint_weights
from normlightning.norms.model_walk import statistics_mode
from normlightning.tasks.classification import ClassificationTask, EvalStage

__all__ = ["NORM_STATISTICS_MODES", "FewShotTask"]

#: How an episode's norm layers get their statistics (the ``test_norm_statistics`` setting).
EpisodeStatisticsMode = Literal["eval", "transductive"]
NORM_STATISTICS_MODES: tuple[str, ...] = get_args(EpisodeStatisticsMode)


class FewShotTask(ClassificationTask):
    """Base-class training with a cosine classifier; imprinted-weight episodes for val/test.

    The backbone must expose ``features(x) -> (N, D)`` (the embedding) and a ``classifier``
    head with ``in_features`` (``resnet12``: a cosine classifier on 640-d features;
    ``small_cnn``: a linear head on ``2 * width`` features); the head is replaced by a fresh
    :class:`~normlightning.models.cosine_classifier.CosineClassifier` over ``num_classes`` base
    classes, so ``cosine_scale``/``learn_scale`` are the only scale settings.

    Args:
        backbone: registry name (``resnet12`` for the paper; ``small_cnn`` for quick runs).
        num_classes: number of base classes (linked from ``data.num_classes``).
        input_shape: ``(C, H, W)`` (linked from ``data.input_shape``).
        cosine_scale: initial temperature ``s`` of the cosine classifier (10, Gidaris & Komodakis).
        learn_scale: learn ``s`` (else fixed).
        test_norm_statistics: ``eval`` or ``transductive``, see the module docstring. Not saved in
            checkpoints (set it when testing; ``load_from_checkpoint`` gives ``eval`` unless passed).
        **kwargs: the other arguments of :class:`~normlightning.tasks.classification.ClassificationTask`
            (``backbone_kwargs``, ``input_mean``, ``input_std``, ``label_smoothing``,
            ``optimizer``, ``lr_scheduler``, ...).
    """

    #: ``test_norm_statistics`` is an evaluation setting, not a property of the trained weights: kept out
    #: of the saved hyperparameters, because LightningCLI lets a checkpoint's hyperparameters override the
    #: command line (``test --ckpt_path ... --model.init_args.test_norm_statistics=transductive`` would
    #: otherwise silently keep the value the model was trained with).
    unsaved_hparams = (*ClassificationTask.unsaved_hparams, "test_norm_statistics")

    def __init__(
        self,
        *,
        backbone: str = "resnet12",
        num_classes: int = 64,
        input_shape: tuple[int, int, int] = (3, 84, 84),
        cosine_scale: float = 10.0,
        learn_scale: bool = True,
        test_norm_statistics: EpisodeStatisticsMode = "eval",
        **kwargs: Any,
    ) -> None:
        if test_norm_statistics not in NORM_STATISTICS_MODES:
            raise ValueError(
                f"test_norm_statistics must be one of {NORM_STATISTICS_MODES} (eval: running statistics; "
                f"transductive: the episode batch's own statistics), got {test_norm_statistics!r}"
            )
        if not cosine_scale > 0:
            raise ValueError(f"cosine_scale must be > 0, got {cosine_scale}")
        super().__init__(backbone=backbone, num_classes=num_classes, input_shape=input_shape, **kwargs)
        features = getattr(self.backbone, "features", None)
        head = getattr(self.backbone, "classifier", None)
        if not callable(features) or head is None or not isinstance(getattr(head, "in_features", None), int):
            raise TypeError(
                f"FewShotTask needs a backbone with a features(x) -> (N, D) callable and a `classifier` head with "
                f"`in_features` (e.g. resnet12 or small_cnn); {backbone!r} builds {type(self.backbone).__name__}"
            )
        self.backbone.classifier = CosineClassifier(head.in_features, num_classes, cosine_scale, learn_scale)
        self.test_norm_statistics = test_norm_statistics
        self.test_episode_accuracies: dict[int, Tensor] = {}
        self.test_results: dict[int, dict[str, float]] = {}
        self._episode_accs: dict[int, list[Tensor]] = {}
        self._episode_ids: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ episodes
    def embed(self, x: Tensor) -> Tensor:
        """Images ``(N, C, H, W)`` in ``[0, 1]`` -> embeddings ``(N, D)``."""
        return self.backbone.features(self.normalize(x))

    def episode_statistics(self) -> contextlib.AbstractContextManager:
        """The context the episode forward runs in (per ``test_norm_statistics``)."""
        if self.test_norm_statistics == "transductive":
            return statistics_mode(self, "train_frozen", sync=False)
        return contextlib.nullcontext()

    def episode_logits(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Query logits ``(N*Q, N)`` with imprinted weights, and the query labels ``(N*Q,)`` in ``0 .. N-1``."""
        n, k, q = int(batch["n_way"]), int(batch["k_shot"]), int(batch["q_query"])
        with self.episode_statistics():
            feats = self.embed(batch["image"])
        support, support_y, query, query_y = split_episode(feats, batch["label"], n, k, q)
        weights = imprint_weights(support, support_y, n)
        return cosine_logits(query, weights, self.backbone.classifier.scale), query_y

    def _check_episode(self, batch: Any, stage: str) -> dict[str, Any]:
        if not isinstance(batch, dict) or not {"image", "label", "n_way", "k_shot", "q_query"} <= set(batch):
            raise TypeError(
                f"FewShotTask {stage} batches must be episodes (dicts with image, label, n_way, k_shot, q_query), "
                "as the loaders of a normlightning.data.few_shot.FewShotDataModule yield; "
                f"got {type(batch).__name__}. Use MiniImageNet or ClassSplitFewShotDataModule as data."
            )
        return batch

    @override
    def eval_step(self, batch: Any, batch_idx: int, stage: EvalStage) -> None:
        """One episode: at ``val`` log its query accuracy and loss (``val/acc1``, ``val/loss``); at ``test``
        keep its accuracy per ``K`` (:meth:`on_test_epoch_end` reports the mean and its 95% interval)."""
        batch = self._check_episode(batch, stage)
        logits, query_y = self.episode_logits(batch)
        acc = (logits.argmax(dim=1) == query_y).float().mean()
        if stage == "val":
            loss = F.cross_entropy(logits, query_y)
            self.log("val/acc1", acc, on_epoch=True, prog_bar=True, batch_size=1, sync_dist=True)
            self.log("val/loss", loss, on_epoch=True, batch_size=1, sync_dist=True)
            return
        k = int(batch["k_shot"])
        self._episode_accs.setdefault(k, []).append(acc.detach())
        self._episode_ids.setdefault(k, []).append(int(batch.get("episode", len(self._episode_ids.get(k, [])))))

    # ------------------------------------------------------------------ test
    @override
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._episode_accs, self._episode_ids = {}, {}
        for loader in getattr(self.trainer, "test_dataloaders", None) or []:
            k_shot = getattr(getattr(loader, "dataset", None), "k_shot", None)
            if k_shot is not None:  # register every K, also where this process got no episode
                self._episode_accs.setdefault(int(k_shot), [])
                self._episode_ids.setdefault(int(k_shot), [])

    def gather_episodes(self, accs: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Per-episode accuracies and episode indices of all processes, sorted by episode index.

        Processes may hold different numbers of episodes: each pads to the largest count with
        ``-1`` indices before ``all_gather``; padding is dropped afterwards. One process: as is.
        """
        world = int(getattr(self.trainer, "world_size", 1)) if self._trainer is not None else 1
        if world > 1:
            count = self.all_gather(torch.tensor(len(ids), device=self.device)).max()
            pad = int(count) - len(ids)
            accs = torch.cat([accs, accs.new_zeros(pad)])
            ids = torch.cat([ids, ids.new_full((pad,), -1)])
            accs, ids = self.all_gather(accs).flatten(), self.all_gather(ids).flatten()
            keep = ids >= 0
            accs, ids = accs[keep], ids[keep]
        order = torch.argsort(ids)
        return accs[order], ids[order]

    @override
    def on_test_epoch_end(self) -> None:
        lines = []
        for k in sorted(self._episode_accs):
            local = self._episode_accs[k]
            accs = torch.stack(local).float() if local else torch.zeros(0, device=self.device)
            ids = torch.as_tensor(self._episode_ids[k], dtype=torch.long, device=self.device)
            accs, ids = self.gather_episodes(accs, ids)
            if len(ids) != len(torch.unique(ids)):
                raise RuntimeError(f"{k}-shot: an episode was evaluated twice; check the episode sharding")
            mean, ci95 = mean_confidence_interval(accs.cpu())
            self.test_episode_accuracies[k] = accs.cpu()
            self.test_results[k] = {"acc": mean, "ci95": ci95, "episodes": float(len(accs))}
            # identical on every process after the gather; sync_dist only silences Lightning's DDP warning
            self.log(f"test/acc_{k}shot", mean, sync_dist=True)
            self.log(f"test/ci95_{k}shot", ci95, sync_dist=True)
            lines.append(f"{k}-shot: {100 * mean:.2f} +- {100 * ci95:.2f} % ({len(accs)} episodes)")
        if lines:
            rank_zero_info(f"few-shot test ({self.test_norm_statistics} norm statistics): " + "; ".join(lines))
        self._episode_accs, self._episode_ids = {}, {}
