"""Progress bars and one-line results of the post-training tools (recalibration, example weighing)."""

from __future__ import annotations

import re

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlightning.callbacks import (
    ExampleWeighingSearch,
    Recalibration,
    recalibrate_statistics,
    search_example_weighing,
)
from normlightning.norms import build_norm


class _Task(LightningModule):
    """Linear classifier behind normlightning's BN (batch statistics, example weighing)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 4), build_norm("bn", 4), nn.Linear(4, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 40, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size=batch_size
    )


def _bar_states(text: str, desc: str) -> list[str]:
    """Every drawn state of the tqdm bar ``desc`` (bars redraw in place with carriage returns)."""
    states = [s for s in re.split(r"[\r\n]", text) if re.match(rf"{re.escape(desc)}: +\d+%\|", s)]
    assert states, f"no {desc!r} progress bar in {text!r}"
    return states


def _final_bar_line(text: str, desc: str) -> str:
    """The last state of a bar that stays on screen (tqdm draws the final state when it closes)."""
    return _bar_states(text, desc)[-1]


def test_recalibration_function_draws_a_bar_over_its_batches(capsys) -> None:
    model = _Task()
    assert recalibrate_statistics(model, _loader(), num_batches=3, progress=True) == 3
    final = _final_bar_line(capsys.readouterr().out, "Recalibration")
    assert "100%" in final and "3/3" in final
    recalibrate_statistics(model, _loader(), num_batches=3)  # progress is off by default
    assert "Recalibration" not in capsys.readouterr().out


def test_example_weighing_bar_covers_every_alpha_and_batch(capsys) -> None:
    alphas = [0.0, 0.125, 0.5]
    result = search_example_weighing(_Task().eval(), _loader(), alphas, progress=True)
    final = _final_bar_line(capsys.readouterr().out, "Example weighing")
    assert f"{3 * 5}/{3 * 5}" in final  # 3 alphas x 5 validation batches
    assert "alpha=0.5" in final and f"acc={result.accuracies[-1]:.4f}" in final


def test_callbacks_show_bars_in_a_run_and_end_with_one_line(tmp_path, capsys, lightning_info) -> None:
    recalibration = Recalibration(num_batches=2, report_accuracy=True)
    weighing = ExampleWeighingSearch(alphas=[0.0, 0.25], save_checkpoint=False)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        callbacks=[recalibration, weighing],
    )
    trainer.fit(_Task(), _loader(), _loader())
    out = capsys.readouterr().out
    # below the training bar and removed when done (as Lightning's validation bar): every state has the total
    assert all(re.search(r" \d+/2 \[", s) for s in _bar_states(out, "Recalibration"))
    assert all(re.search(r" \d+/5 \[", s) for s in _bar_states(out, "Recalibration: val acc before"))
    assert all(re.search(r" \d+/10 \[", s) for s in _bar_states(out, "Example weighing"))  # 2 alphas x 5 batches
    (line,) = [m for m in lightning_info if m.startswith("Recalibration:")]
    before, after = (
        recalibration.last_result["recalibration/acc_before"],
        recalibration.last_result["recalibration/acc_after"],
    )
    assert re.fullmatch(rf"Recalibration: 2 batches in \d+\.\d s, val acc {before:.4f} -> {after:.4f}", line)
    (line,) = [m for m in lightning_info if m.startswith("ExampleWeighingSearch:")]
    best = max(row["accuracy"] for row in weighing.table)
    assert re.fullmatch(
        rf"ExampleWeighingSearch: best alpha {weighing.alpha:.6g}, val acc {best:.4f} "
        r"\(alpha 0: \d\.\d{4}\), 2 alphas in \d+\.\d s",
        line,
    )


def test_no_bars_when_the_run_hides_its_progress_bar(tmp_path, capsys) -> None:
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[Recalibration(num_batches=2)],
    )
    trainer.fit(_Task(), _loader())
    assert "Recalibration" not in capsys.readouterr().out
