"""The tasks' ``compile`` argument: the forward compiled in place at the Trainer's set-up, after the
norm injection, with the same outputs as eager. (Backend ``aot_eager``: Dynamo + AOTAutograd
without a C++ build, so the test stays fast on CPU; the default inductor backend is what
benchmarks/train_step.py --compile measures.)"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from normlightning.callbacks import NormInjection
from normlightning.cli import build_cli
from normlightning.data import Synthetic
from normlightning.tasks import ClassificationTask

ARGS = dict(backbone="small_cnn", num_classes=5, input_shape=(2, 6, 6), backbone_kwargs={"width": 4})


def test_compiled_fit_keeps_names_and_matches_eager(tmp_path) -> None:
    torch.manual_seed(0)
    task = ClassificationTask(**ARGS, compile={"backend": "aot_eager"}, optimizer=partial(torch.optim.SGD, lr=0.05))
    names = sorted(task.state_dict())
    data = Synthetic(input_shape=(2, 6, 6), num_classes=5, num_train=16, num_val=8, num_test=8, batch_size=8)
    trainer = Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[NormInjection(method="hn")],
    )
    trainer.fit(task, datamodule=data)
    assert task._compiled_call_impl is not None
    assert type(task.backbone.features[0][1]).__name__ == "HeterologousNorm"  # injected before compiling
    assert sorted(task.state_dict()) == names  # in place: no "_orig_mod." prefixes (hn keeps BN's buffer names)
    eager = ClassificationTask(**ARGS)
    NormInjection(method="hn").setup(trainer, eager, "fit")
    eager.load_state_dict(task.state_dict())
    x = torch.rand(3, 2, 6, 6)
    task.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(task(x), eager(x), rtol=1e-5, atol=1e-6)


def test_compile_argument_checks_and_cli() -> None:
    assert ClassificationTask(**ARGS).compile_options is None
    assert ClassificationTask(**ARGS, compile=True).compile_options == {}
    with pytest.raises(TypeError, match="compile must be"):
        ClassificationTask(**ARGS, compile="yes")
    config = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
    cli = build_cli(
        [
            "--config",
            config,
            "--model.init_args.compile={backend: aot_eager, dynamic: false}",
            "--trainer.logger=false",
        ],
        run=False,
    )
    assert cli.model.compile_options == {"backend": "aot_eager", "dynamic": False}
