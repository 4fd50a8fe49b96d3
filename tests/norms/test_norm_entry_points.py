"""Installed packages add methods through the entry-point group ``normlightning.norms``: the
registry and the CLI find them with no wrapper script, a plugin is imported only when its name is
used, one that fails to import is named with its package, and a name clash is refused.

Each test "installs" a package the way pip leaves it for ``importlib.metadata``: a
``<name>-<version>.dist-info`` folder with ``METADATA`` and ``entry_points.txt`` next to the
package's module, in a folder put on ``sys.path``."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from normlightning.callbacks.run_hparams import norm_argument_names
from normlightning.cli import build_cli
from normlightning.norms import available_norms, build_norm, register_norm, registry
from normlightning.norms.model_walk import is_norm_layer
from normlightning.norms.testing import check_norm_layer

REPO_ROOT = Path(__file__).resolve().parents[2]


def docs_plugin_source() -> str:
    """The plugin file of docs/methods.md, "Adding a method" (the block that starts ``# my_norm.py``):
    the tests install the example the docs show."""
    text = (REPO_ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n# my_norm.py\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 1, "docs/methods.md has no single ```python block starting with '# my_norm.py'"
    return blocks[0]


#: The plugin's layer: per-example RMS normalization over (C, S) with a per-channel affine.
PLUGIN_SOURCE = docs_plugin_source()


def install(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str] | None = None) -> None:
    """Write the package ``dist`` 0.1 into ``site``: its modules and a dist-info folder declaring
    ``entry_points`` (name -> ``module:attr``) in the group ``normlightning.norms``."""
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{lines}\n")
    for module, source in (modules or {}).items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """A folder on ``sys.path`` for installed packages; entry points are discovered afresh, and the
    plugin modules imported by the test are forgotten afterwards."""
    folder = tmp_path / "site-packages"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(registry, "_ENTRY_POINTS", None)
    before = set(sys.modules)
    yield folder
    for module in set(sys.modules) - before:
        if module.startswith("nl_plugin_"):
            del sys.modules[module]


def test_an_installed_plugin_is_a_method_imported_at_first_use(site):
    install(site, "my-rms-norm", {"chrms": "nl_plugin_rms:ChannelRMSNorm"}, {"nl_plugin_rms": PLUGIN_SOURCE})
    assert "chrms" in available_norms() and {"bn", "bgn"} <= set(available_norms())
    assert "nl_plugin_rms" not in sys.modules  # listed, not imported
    layer = build_norm("chrms", 4, eps=1e-3)
    assert type(layer).__name__ == "ChannelRMSNorm" and type(layer).__module__ == "nl_plugin_rms"
    assert layer.eps == 1e-3 and is_norm_layer(layer)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).mean(dim=(1, 2, 3), keepdim=True) + 1e-3)  # the formula, written out
    torch.testing.assert_close(layer.double()(x), expected)
    check_norm_layer("chrms")


def test_the_cli_runs_an_installed_plugin_without_a_wrapper(site, run_dir):
    install(site, "my-rms-norm", {"chrms": "nl_plugin_rms:ChannelRMSNorm"}, {"nl_plugin_rms": PLUGIN_SOURCE})
    cli = build_cli(
        [  # what `normlightning fit ... --norm.method chrms` runs (main() is build_cli(args))
            "fit",
            "--data=normlightning.data.Synthetic",
            "--data.input_shape=[1, 6, 6]",
            "--data.num_classes=3",
            "--data.num_train=8",
            "--data.num_val=4",
            "--data.num_test=4",
            "--data.batch_size=4",
            "--model=normlightning.tasks.ClassificationTask",
            "--model.backbone=small_cnn",
            "--model.backbone_kwargs={width: 4}",
            "--norm.method",
            "chrms",
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={run_dir}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    kinds = {type(m).__name__ for m in cli.model.modules() if is_norm_layer(m)}
    assert kinds == {"ChannelRMSNorm"}  # every BatchNorm of small_cnn replaced by the plugin's layer
    assert cli.trainer.state.finished


def test_a_plugin_that_fails_to_import_is_named_with_its_package(site):
    install(
        site,
        "broken-norm",
        {"brokennorm": "nl_plugin_broken:Layer"},
        {"nl_plugin_broken": "import nl_plugin_missing_dependency\n"},
    )
    assert "brokennorm" in available_norms()  # listing imports nothing, so it cannot fail
    build_norm("bn", 4)  # a broken plugin fails only the runs that use it
    with pytest.raises(
        registry.NormPluginError,
        match=(
            r"entry point 'brokennorm' = 'nl_plugin_broken:Layer' \(group normlightning.norms\) of package "
            r"broken-norm 0.1 failed to import: ModuleNotFoundError: No module named 'nl_plugin_missing_dependency'"
        ),
    ):
        build_norm("brokennorm", 4)
    with pytest.raises(registry.NormPluginError, match="'brokennorm' .* of package broken-norm 0.1 failed to import"):
        norm_argument_names()  # a CLI run's hyperparameters read every registered method: it stops there too


def test_a_plugin_that_is_not_callable_is_refused(site):
    install(site, "odd-norm", {"oddnorm": "nl_plugin_odd:LAYER"}, {"nl_plugin_odd": "LAYER = 3\n"})
    with pytest.raises(
        registry.NormPluginError, match="'oddnorm' .* of package odd-norm 0.1 gives a int, not a layer class"
    ):
        build_norm("oddnorm", 4)


def test_a_plugin_cannot_take_a_builtin_name(site):
    install(site, "bn-clash", {"bn": "nl_plugin_rms:ChannelRMSNorm"}, {"nl_plugin_rms": PLUGIN_SOURCE})
    with pytest.raises(
        registry.NormPluginError,
        match=(
            r"entry point 'bn' = 'nl_plugin_rms:ChannelRMSNorm' .* of package bn-clash 0.1 reuses the name of the "
            r"built-in method 'bn'.* Rename the entry point"
        ),
    ):
        available_norms()


def test_two_packages_cannot_claim_one_name(site):
    install(site, "first-norm", {"twice": "nl_plugin_a:Layer"})
    install(site, "second-norm", {"twice": "nl_plugin_b:Layer"})
    with pytest.raises(registry.NormPluginError, match="claim the same method name; uninstall one of the packages"):
        build_norm("twice", 4)


def test_register_norm_over_an_installed_plugin_needs_overwrite(site):
    install(site, "my-rms-norm", {"chrms": "nl_plugin_rms:ChannelRMSNorm"}, {"nl_plugin_rms": PLUGIN_SOURCE})
    with pytest.raises(ValueError, match="register_norm: 'chrms' is the entry point .*; pass overwrite=True"):
        register_norm("chrms", torch.nn.Identity)
    register_norm("chrms", torch.nn.Identity, overwrite=True)
    assert isinstance(build_norm("chrms", 4), torch.nn.Identity)
