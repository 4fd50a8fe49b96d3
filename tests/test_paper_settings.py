"""The paper configs, as ``--print_config`` resolves them, against what the papers state.

:data:`PAPER` is written from the papers' text (shared/papers; the section or table is named next to
each value): method, group counts, HN's mean/std sets, per-GPU batch, optimizer and learning rate,
schedule and epochs, augmentation and crop/padding, the PGD attack and the few-shot protocol. Values a
paper leaves open are not in the table (the configs mark them "SILENT on" / "assumed"), with three
kinds of exception, each a check of a property rather than of our value:

* :data:`EXPLICIT`: the group count is stated in the config (not a layer default), even where the paper
  gives none;
* :func:`held_out`: validation is carved out of the training set where the paper reports validation and
  test apart (SeqNorm CIFAR) or tunes on held-out data (Four Things' alpha search);
* BGN's ``num_groups: auto`` resolves, at the config's per-GPU batch, to the paper's G for that batch.

Configs that are no paper experiment are listed in :data:`NOT_PAPER`. Every config in configs/ is in
exactly one of the two, and docs/experiments.md lists every config and marks the :data:`NOT_PAPER` ones.
The resolved configs come from the session cache of ``resolve_config`` (conftest.py), which
tests/test_configs.py fills: in a full run this file parses nothing again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from normlightning.norms.batch_group_norm import bgn_paper_groups

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
RANDAUGMENT = "normlightning.data.randaugment.RandAugmented"


def EXPLICIT(value: Any) -> bool:  # noqa: N802 (a table marker, read like a value)
    """The config states the count (an int or ``auto``), so no layer default decides it."""
    return value is not None


def held_out(value: Any) -> bool:
    """A fraction of the training set held out for validation."""
    return isinstance(value, float) and 0.0 < value < 1.0


# ---------------------------------------------------------------- HN (paper 002)
#: §4.1 (CIFAR; §4.2 CIFAR-100 "the same as Section 4.1"): "padded with 0 to 36x36 and then randomly cropped
#: to 32x32 ... randomly horizontal flipping ... Weight decay of 0.0005 and SGD with 0.9 momentum ... batch
#: size of 128, the initial learning rate is set to 0.1 ... 0.1 * n/128 ... 200 epochs and decrease the
#: learning rate by 10x at 100 and 150 epochs. One GPU".
HN_RECIPE = {
    "opt.class": "torch.optim.SGD",
    "opt.momentum": 0.9,
    "opt.weight_decay": 5e-4,
    "opt.lr": 0.1,
    "model.lr_base_batch_size": 128,
    "trainer.max_epochs": 200,
    "sched.class": "torch.optim.lr_scheduler.MultiStepLR",
    "sched.milestones": [100, 150],
    "sched.gamma": 0.1,
    "trainer.devices": 1,
}
HN_CIFAR = {**HN_RECIPE, "data.augment": True, "data.crop_padding": 2}
#: ResNet18 on CIFAR (§4.1, Figure 2, Tables 2 and 4)
HN_R18 = {**HN_CIFAR, "model.backbone": "cifar_resnet18"}
#: HN = (BN, EN) with EN's channel group 1 (§4.1 ablation: "mean's group to c and the std's group to 1 ... the
#: best accuracy when the batch size is 128"; §4.4: "the channel group of EN is 1"); HN_G32 / HN_G8: EN_G32 / EN_G8
HN = {"norm.method": "hn", "norm.kwargs.mean": "bn", "norm.kwargs.std": "en:1"}
HN_STD = {"norm.method": "hn", "norm.kwargs.mean": "bn"}
#: §4.3: "80% images as the training data and 20% ... as the test data ... the same as Section 4.1, except
#: CalTech256's image size is 224x224" (Tables 5, 7: batch 128 and 4)
HN_CALTECH = {
    **HN_RECIPE,
    "data.class": "normlightning.data.caltech256.Caltech256",
    "data.test_fraction": 0.2,
    "data.image_size": 224,
    "data.batch_size": 128,
}
#: §4.4: ResNet18; "resized to 256x256, and then cropped by 224x224 at the center"; "Weight decay of 0.0001, and
#: SGD with 0.9 momentum"; "Four GPUs"; "computed within each GPU"; 64 images per GPU; "100 epochs ... at 30, 60,
#: and 90". Its LR sentence contradicts itself (see imagenet_hn.yaml): no lr here.
HN_IMAGENET = {
    "model.backbone": "resnet18",
    "opt.class": "torch.optim.SGD",
    "opt.momentum": 0.9,
    "opt.weight_decay": 1e-4,
    "trainer.max_epochs": 100,
    "sched.milestones": [30, 60, 90],
    "sched.gamma": 0.1,
    "trainer.devices": 4,
    "trainer.sync_batchnorm": False,
    "data.class": "normlightning.data.ImageNet",
    "data.batch_size": 64,
    "data.image_size": 224,
    "data.eval_resize_mode": "square",
    "data.resize": None,  # None: 224 * 256 / 224 = 256
}
CIFAR10 = {"data.class": "normlightning.data.CIFAR10"}
CIFAR100 = {"data.class": "normlightning.data.CIFAR100"}

# ---------------------------------------------------------------- BGN (paper 004)
#: "Implementation details": ResNet-50, "8 GPUs", statistics "within each GPU", "120 epochs ... decayed by 10x at
#: the 30th, 60th, and 90th epoch", LR 0.4 at 128/GPU ... 0.00625 at 2/GPU (0.1 per 256 images), SGD, weight decay
#: 1e-4, "224x224 patches for the center", "median accuracy in the last five epochs".
BGN_IMAGENET = {
    "model.backbone": "resnet50",
    "trainer.devices": 8,
    "trainer.sync_batchnorm": False,
    "trainer.max_epochs": 120,
    "sched.milestones": [30, 60, 90],
    "sched.gamma": 0.1,
    "opt.class": "torch.optim.SGD",
    "opt.lr": 0.1,
    "model.lr_base_batch_size": 256,
    "opt.weight_decay": 1e-4,
    "data.class": "normlightning.data.ImageNet",
    "data.image_size": 224,
    "callbacks.MedianOfLastEpochs.k": 5,
}
#: "Comparison with baselines": BGN's G for per-GPU batch 128, 64, 32, 16, 8, 4, 2
BGN_PAPER_G = {128: 512, 64: 256, 32: 128, 16: 64, 8: 16, 4: 2, 2: 1}
#: "Adversarial Training on CIFAR-10": WideResNet depth 10, wide factor 2; "four-step PGD"; "step size as 2/255,
#: and the maximum perturbation norm as 0.0157"; "200 epochs"; "G = 128 is used in GN and BGN"; "Adam optimizer with
#: a learning rate of 0.01". Trained and evaluated against the attack.
ATTACK = {"eps": 0.0157, "step_size": 2 / 255, "steps": 4}
PGD = {
    "model.backbone": "wide_resnet",
    "model.backbone_kwargs.depth": 10,
    "model.backbone_kwargs.widen_factor": 2,
    **{f"model.train_attack.{k}": v for k, v in ATTACK.items()},
    **{f"model.eval_attack.{k}": v for k, v in ATTACK.items()},
    "trainer.max_epochs": 200,
    "opt.class": "torch.optim.Adam",
    "opt.lr": 0.01,
    **CIFAR10,
}
#: "Few Shot Learning": imprinted weights, ResNet-12 of TADAM (Oreshkin et al. 2018), "SGD with Nesterov momentum
#: set to 0.9, weight decay to 0.0005, mini-batch size to 256, and 60 epochs ... 84x84. The learning rate was
#: initialized to 0.1, and changed to 0.006, 0.0012, and 0.00024 at the 20th, 40th and 50th"; Table 6: 5-way
#: 1-shot and 5-shot, "600 randomly generated test episodes with 95% confidence intervals"; miniImageNet's 64
#: base classes (Vinyals et al.'s split, as Gidaris & Komodakis).
FEW_SHOT = {
    "model.backbone": "resnet12",
    "model.backbone_kwargs.variant": "tadam",
    "opt.class": "torch.optim.SGD",
    "opt.nesterov": True,
    "opt.momentum": 0.9,
    "opt.weight_decay": 5e-4,
    "opt.lr": 0.1,
    "data.batch_size": 256,
    "trainer.devices": 1,
    "trainer.max_epochs": 60,
    "sched.milestones": [20, 40, 50],
    "sched.factors": [0.06, 0.012, 0.0024],
    "data.image_size": 84,
    "data.n_way": 5,
    "data.test_shots": [1, 5],
    "data.test_episodes": 600,
    "data.num_base_classes": 64,
}

# ---------------------------------------------------------------- SeqNorm (paper 000)
#: Tables 1-2 (CIFAR-100, CIFAR-10, ImageNet): the rows' G_C / G_M. Validation and test are reported apart
#: (CIFAR: validation held out of train); Table 1's RandAugment rows give no G (the configs mark theirs assumed).
SEQ_CIFAR = {"data.val_fraction": held_out}
RA = {"data.randaugment": True}
SEQNORM = {"norm.method": "seqnorm"}

# ---------------------------------------------------------------- Four Things (paper 001)
#: the abstract: Ghost Batch Normalization, inference example weighing (searched on held-out data), weight decay
#: on gamma and beta; the published dataset-split text (see the configs' headers).
FOUR = {
    "norm.method": "ghost",
    "callbacks.ExampleWeighingSearch.batch_size": EXPLICIT,
    "model.gamma_weight_decay": EXPLICIT,
    "model.beta_weight_decay": EXPLICIT,
}

PAPER: dict[str, dict[str, Any]] = {
    # HN: CIFAR-10, Figure 2 / Table 2 (batch 128; Figure 2(b) and 3(b) at batch 4)
    "cifar10_hn.yaml": {**HN_R18, **CIFAR10, **HN, "data.batch_size": 128},
    "cifar10_hn_bn.yaml": {**HN_R18, **CIFAR10, "norm.method": "bn", "data.batch_size": 128},
    "cifar10_hn_sn.yaml": {**HN_R18, **CIFAR10, "norm.method": "sn", "data.batch_size": 128},
    "cifar10_hn_in_ln.yaml": {
        **HN_R18,
        **CIFAR10,
        "norm.method": "hn",
        "norm.kwargs.mean": "in",
        "norm.kwargs.std": "ln",
        "data.batch_size": 128,
    },
    "cifar10_hn_ln_in.yaml": {
        **HN_R18,
        **CIFAR10,
        "norm.method": "hn",
        "norm.kwargs.mean": "ln",
        "norm.kwargs.std": "in",
        "data.batch_size": 128,
    },
    "cifar10_hn_en32_b4.yaml": {**HN_R18, **CIFAR10, **HN_STD, "norm.kwargs.std": "en:32", "data.batch_size": 4},
    "cifar10_hn_en8_b4.yaml": {**HN_R18, **CIFAR10, **HN_STD, "norm.kwargs.std": "en:8", "data.batch_size": 4},
    # HN: Table 3 (batch 128)
    "cifar10_hn_densenet121.yaml": {
        **HN_CIFAR,
        **CIFAR10,
        **HN,
        "model.backbone": "cifar_densenet121",
        "data.batch_size": 128,
    },
    "cifar10_hn_mobilenetv2_x035.yaml": {
        **HN_CIFAR,
        **CIFAR10,
        **HN,
        "model.backbone": "cifar_mobilenet_v2",
        "model.backbone_kwargs.width_mult": 0.35,
        "data.batch_size": 128,
    },
    "cifar10_hn_mobilenetv2_x1.yaml": {
        **HN_CIFAR,
        **CIFAR10,
        **HN,
        "model.backbone": "cifar_mobilenet_v2",
        "model.backbone_kwargs.width_mult": 1.0,
        "data.batch_size": 128,
    },
    "cifar10_hn_shufflenetv2_x15.yaml": {
        **HN_CIFAR,
        **CIFAR10,
        **HN,
        "model.backbone": "cifar_shufflenet_v2",
        "model.backbone_kwargs.width_mult": 1.5,
        "data.batch_size": 128,
    },
    # HN: CIFAR-100 Table 4, Caltech-256 Tables 5 and 7, ImageNet Table 6
    "cifar100_hn.yaml": {**HN_R18, **CIFAR100, **HN, "data.batch_size": 128},
    "cifar100_hn_en32.yaml": {**HN_R18, **CIFAR100, **HN_STD, "norm.kwargs.std": "en:32", "data.batch_size": 128},
    "caltech256_hn.yaml": {**HN_CALTECH, **HN},
    "caltech256_hn_en32.yaml": {**HN_CALTECH, **HN_STD, "norm.kwargs.std": "en:32"},
    "caltech256_hn_bn_en.yaml": {**HN_CALTECH, **HN_STD, "norm.kwargs.std": "bn+en:1"},
    "caltech256_hn_bn_in_ln.yaml": {**HN_CALTECH, **HN_STD, "norm.kwargs.std": "bn+in+ln"},
    "imagenet_hn.yaml": {**HN_IMAGENET, **HN},
    "imagenet_hn_bn.yaml": {**HN_IMAGENET, "norm.method": "bn"},
    "imagenet_hn_gn.yaml": {**HN_IMAGENET, "norm.method": "gn", "norm.num_groups": EXPLICIT},  # G not given
    # BGN: ImageNet Table 2 (GN: "The group number in GN is set as 32"; GBGN: channel groups 32, one batch group
    # of the whole per-GPU batch, see docs/experiments.md)
    "imagenet_bgn.yaml": {**BGN_IMAGENET, "norm.method": "bgn", "norm.num_groups": "auto"},
    "imagenet_bgn_bn.yaml": {**BGN_IMAGENET, "norm.method": "bn"},
    "imagenet_bgn_gn.yaml": {**BGN_IMAGENET, "norm.method": "gn", "norm.num_groups": 32},
    "imagenet_bgn_gbgn.yaml": {
        **BGN_IMAGENET,
        "norm.method": "gbgn",
        "norm.kwargs.channel_groups": 32,
        "norm.kwargs.examples_per_group": None,
    },
    "imagenet_bgn_in.yaml": {**BGN_IMAGENET, "norm.method": "in"},
    "imagenet_bgn_ln.yaml": {**BGN_IMAGENET, "norm.method": "ln"},
    "imagenet_bgn_pn.yaml": {**BGN_IMAGENET, "norm.method": "pn"},
    # BGN: adversarial training, Table 5 (GN with G = 128 read as groups of C*H*W: docs/methods.md, gnflat)
    "cifar10_pgd_bn.yaml": {**PGD, "norm.method": "bn"},
    "cifar10_pgd_in.yaml": {**PGD, "norm.method": "in"},
    "cifar10_pgd_ln.yaml": {**PGD, "norm.method": "ln"},
    "cifar10_pgd_pn.yaml": {**PGD, "norm.method": "pn"},
    "cifar10_pgd_gn.yaml": {**PGD, "norm.method": "gnflat", "norm.num_groups": 128},
    "cifar10_pgd_bgn.yaml": {**PGD, "norm.method": "bgn", "norm.num_groups": 128},
    # BGN: few-shot, Table 6 (G of GN and BGN not given for this experiment)
    "miniimagenet_imprint_bn.yaml": {**FEW_SHOT, "norm.method": "bn"},
    "miniimagenet_imprint_in.yaml": {**FEW_SHOT, "norm.method": "in"},
    "miniimagenet_imprint_ln.yaml": {**FEW_SHOT, "norm.method": "ln"},
    "miniimagenet_imprint_pn.yaml": {**FEW_SHOT, "norm.method": "pn"},
    "miniimagenet_imprint_gn.yaml": {**FEW_SHOT, "norm.method": "gn", "norm.num_groups": EXPLICIT},
    "miniimagenet_imprint_bgn.yaml": {**FEW_SHOT, "norm.method": "bgn", "norm.num_groups": EXPLICIT},
    # SeqNorm: Table 1 (CIFAR-100)
    "cifar100_seqnorm.yaml": {
        **CIFAR100,
        **SEQ_CIFAR,
        **SEQNORM,
        "norm.kwargs.channel_groups": 4,
        "norm.kwargs.batch_groups": 8,
    },
    "cifar100_seqnorm_bn.yaml": {**CIFAR100, **SEQ_CIFAR, "norm.method": "bn"},
    "cifar100_seqnorm_ghost.yaml": {**CIFAR100, **SEQ_CIFAR, "norm.method": "ghost", "norm.num_groups": 8},
    "cifar100_seqnorm_ra.yaml": {
        **CIFAR100,
        **SEQ_CIFAR,
        **RA,
        **SEQNORM,
        "norm.kwargs.channel_groups": EXPLICIT,
        "norm.kwargs.batch_groups": EXPLICIT,
    },
    "cifar100_seqnorm_bn_ra.yaml": {**CIFAR100, **SEQ_CIFAR, **RA, "norm.method": "bn"},
    "cifar100_seqnorm_ghost_ra.yaml": {
        **CIFAR100,
        **SEQ_CIFAR,
        **RA,
        "norm.method": "ghost",
        "norm.num_groups": EXPLICIT,
    },
    # SeqNorm: Table 2 (CIFAR-10, ImageNet)
    "cifar10_seqnorm.yaml": {
        **CIFAR10,
        **SEQ_CIFAR,
        **SEQNORM,
        "norm.kwargs.channel_groups": 16,
        "norm.kwargs.batch_groups": 8,
    },
    "cifar10_seqnorm_bn.yaml": {**CIFAR10, **SEQ_CIFAR, "norm.method": "bn"},
    "cifar10_seqnorm_ghost.yaml": {**CIFAR10, **SEQ_CIFAR, "norm.method": "ghost", "norm.num_groups": 4},
    "imagenet_seqnorm.yaml": {
        "data.class": "normlightning.data.ImageNet",
        **SEQNORM,
        "norm.kwargs.channel_groups": 4,
        "norm.kwargs.batch_groups": 4,
    },
    "imagenet_seqnorm_bn.yaml": {"data.class": "normlightning.data.ImageNet", "norm.method": "bn"},
    "imagenet_seqnorm_ghost.yaml": {
        "data.class": "normlightning.data.ImageNet",
        "norm.method": "ghost",
        "norm.num_groups": 4,
    },
    # Four Things: the six datasets and their splits
    "cifar100_fourthings.yaml": {**FOUR, **CIFAR100, "data.val_fraction": 0.2},  # 40k / 10k of the 50k
    "svhn_fourthings.yaml": {
        **FOUR,
        "data.class": "normlightning.data.svhn.SVHN",
        "data.use_extra": True,
        "data.val_fraction": 0.2,
    },
    "cub200_fourthings.yaml": {**FOUR, "data.class": "normlightning.data.cub200.CUB200", "data.val_fraction": 0.25},
    "caltech256_fourthings.yaml": {
        **FOUR,
        "data.class": "normlightning.data.caltech256.Caltech256",
        "data.per_class_split": [40, 10, 30],
    },
    "flowers102_fourthings.yaml": {**FOUR, "data.class": "normlightning.data.flowers102.Flowers102"},  # own splits
    # ImageNet: val/ is reported (test_dir); alpha is searched on training images held out
    "imagenet_fourthings.yaml": {
        **FOUR,
        "data.class": "normlightning.data.ImageNet",
        "data.test_dir": "val",
        "data.val_dir": None,
        "data.val_fraction": held_out,
    },
}

#: configs that are no paper experiment (docs/experiments.md marks them): the quickstart, an offline few-shot
#: check, and RandAugment on the SeqNorm settings of CIFAR-10 / ImageNet, which the paper does not report.
#: Their group counts are still explicit.
NOT_PAPER: dict[str, dict[str, Any]] = {
    "quickstart.yaml": {},
    "mnist_subset_imprint_bn.yaml": {},
    "cifar10_seqnorm_ra.yaml": {
        **RA,
        **SEQNORM,
        "norm.kwargs.channel_groups": EXPLICIT,
        "norm.kwargs.batch_groups": EXPLICIT,
    },
    "cifar10_seqnorm_bn_ra.yaml": {**RA, "norm.method": "bn"},
    "cifar10_seqnorm_ghost_ra.yaml": {**RA, "norm.method": "ghost", "norm.num_groups": EXPLICIT},
    "imagenet_seqnorm_ra.yaml": {
        **RA,
        **SEQNORM,
        "norm.kwargs.channel_groups": EXPLICIT,
        "norm.kwargs.batch_groups": EXPLICIT,
    },
    "imagenet_seqnorm_bn_ra.yaml": {**RA, "norm.method": "bn"},
    "imagenet_seqnorm_ghost_ra.yaml": {**RA, "norm.method": "ghost", "norm.num_groups": EXPLICIT},
}

_MISSING = object()


def _data(resolved: dict) -> dict:
    """The data section, the RandAugment wrapper's inner DataModule when wrapped."""
    data = resolved["data"]
    return data["init_args"]["data"] if data["class_path"] == RANDAUGMENT else data


def _class_and_args(node: dict | None) -> dict:
    node = node or {}
    return {"class": node.get("class_path"), **(node.get("init_args") or {})}


def _section(resolved: dict, name: str) -> Any:
    model = resolved["model"]["init_args"]
    if name == "data":
        return {**_class_and_args(_data(resolved)), "randaugment": resolved["data"]["class_path"] == RANDAUGMENT}
    if name == "opt":
        return _class_and_args(model.get("optimizer"))
    if name == "sched":
        return _class_and_args(model.get("lr_scheduler"))
    if name == "callbacks":
        callbacks = resolved["trainer"].get("callbacks") or []
        return {c["class_path"].rpartition(".")[2]: c.get("init_args") or {} for c in callbacks}
    if name == "model":
        return model
    return resolved[name]


def setting(resolved: dict, key: str) -> Any:
    """The resolved value at ``key`` = ``<section>.<path>``: sections ``model`` (its init_args), ``data`` (the
    DataModule's init_args, ``class``, ``randaugment``), ``opt`` / ``sched`` (optimizer / scheduler init_args and
    ``class``), ``callbacks`` (by class name), ``trainer``, ``norm``."""
    section, _, path = key.partition(".")
    node = _section(resolved, section)
    for part in path.split("."):
        node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
    return node


def _drift(resolved: dict, expected: dict[str, Any]) -> list[str]:
    wrong = []
    for key, value in expected.items():
        actual = setting(resolved, key)
        if isinstance(value, Callable):
            ok = actual is not _MISSING and value(actual)
        elif isinstance(value, float):
            ok = isinstance(actual, (int, float)) and actual == pytest.approx(value, rel=1e-9)
        else:
            ok = actual == value
        if not ok:
            shown = getattr(value, "__name__", value)
            wrong.append(f"{key}: resolved {'<missing>' if actual is _MISSING else repr(actual)}, paper {shown!r}")
    return wrong


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_matches_the_paper(path: Path, resolve_config) -> None:
    """Every value of :data:`PAPER` (or :data:`NOT_PAPER`) for this config, in the resolved config."""
    expected = PAPER.get(path.name, NOT_PAPER.get(path.name))
    assert expected is not None, f"{path.name}: add it to PAPER (what the paper states) or NOT_PAPER"
    resolved = resolve_config(path)
    wrong = _drift(resolved, expected)
    assert not wrong, f"{path.name} drifted from the paper:\n  " + "\n  ".join(wrong)
    if setting(resolved, "norm.method") == "bgn" and setting(resolved, "norm.num_groups") == "auto":
        batch = setting(resolved, "data.batch_size")
        if path.name.startswith("imagenet_bgn"):  # the paper's G at this per-GPU batch (Table 2 text)
            assert bgn_paper_groups(batch) == BGN_PAPER_G[batch]


def test_every_config_is_in_one_table() -> None:
    names = {p.name for p in CONFIGS}
    assert not set(PAPER) & set(NOT_PAPER)
    assert names == set(PAPER) | set(NOT_PAPER), (
        f"not in the tables: {sorted(names - set(PAPER) - set(NOT_PAPER))}; "
        f"in the tables but not in configs/: {sorted(set(PAPER) | set(NOT_PAPER) - names)}"
    )


def test_the_drift_check_reports_a_changed_value(resolve_config) -> None:
    """A changed value, a missing key and a failed property each show up (the check can fail)."""
    resolved = resolve_config(CONFIG_DIR / "cifar10_hn.yaml")
    assert _drift(resolved, PAPER["cifar10_hn.yaml"]) == []
    resolved["data"]["init_args"]["crop_padding"] = 4
    resolved["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 0.1 + 1e-6
    wrong = _drift(resolved, {**PAPER["cifar10_hn.yaml"], "data.val_fraction": held_out, "norm.num_groups": 3})
    assert sorted(line.partition(":")[0] for line in wrong) == [
        "data.crop_padding",
        "data.val_fraction",
        "norm.num_groups",
        "opt.lr",
    ]


def test_experiments_doc_lists_every_config() -> None:
    """docs/experiments.md links every config and marks the ones that are no paper experiment."""
    text = (REPO_ROOT / "docs" / "experiments.md").read_text(encoding="utf-8")
    rows = {line.split("(../configs/")[1].split(")")[0]: line for line in text.splitlines() if "(../configs/" in line}
    assert set(rows) == {p.name for p in CONFIGS}, sorted({p.name for p in CONFIGS} ^ set(rows))
    for name, row in rows.items():
        assert ("not a paper experiment" in row) == (name in NOT_PAPER), row


def test_imagenet_fourthings_split_searches_on_train_and_reports_val(
    tmp_path, write_image_folders, resolve_config
) -> None:
    """The config's split on a tiny ImageNet layout: validation (the alpha search, the checkpoint choice) is a
    part of train/, the test split is val/, and no image of one is in the other."""
    from normlightning.data import ImageNet

    write_image_folders(tmp_path, classes=("a", "b"), per_class=50)
    args = {
        k: v
        for k, v in resolve_config(CONFIG_DIR / "imagenet_fourthings.yaml")["data"]["init_args"].items()
        if k in ("val_dir", "test_dir", "val_fraction", "seed")
    }
    dm = ImageNet(
        root=str(tmp_path), expected_num_classes=2, image_size=8, num_workers=0, persistent_workers=False, **args
    )
    dm.setup("fit")
    dm.setup("test")
    val, test = dm.datasets["val"], dm.datasets["test"]
    assert len(val) == round(args["val_fraction"] * 100) and len(dm.datasets["train"]) == 100 - len(val)
    val_files = {val.dataset.samples[i][0] for i in val.indices}
    assert all("/train/" in f for f in val_files)
    assert {f for f, _ in test.samples} == {str(p) for p in (tmp_path / "val").rglob("*.jpg")}


def test_pgd_gn_config_is_not_instance_norm(resolve_config) -> None:
    """cifar10_pgd_gn's norm section on its WRN-10-2: every layer is gnflat (the summary names it), and the first
    (16 channels at 32x32, D = 16384) normalizes sets of D / 128 = 128 values, four rows of one channel, not IN's
    whole 32x32 channel."""
    import torch
    import torch.nn.functional as F

    from normlightning.injection import inject
    from normlightning.models.registry import build_backbone

    resolved = resolve_config(CONFIG_DIR / "cifar10_pgd_gn.yaml")
    norm, model_args = resolved["norm"], resolved["model"]["init_args"]
    model = build_backbone(
        model_args["backbone"], num_classes=10, input_shape=(3, 32, 32), **model_args["backbone_kwargs"]
    )
    _, rows = inject(
        model, method=norm["method"], num_groups=norm["num_groups"], example_input=torch.randn(2, 3, 32, 32)
    )
    assert rows and all(row["new"] == "FlatGroupNorm (gnflat)" for row in rows)
    layer = model.get_submodule(rows[0]["layer"])
    x = torch.randn(2, 16, 32, 32, dtype=torch.float64)
    y = layer.double()(x)
    band = x[:, 3, 4:8, :]  # the 4th channel's second band of four rows: one set
    expected = (band - band.mean((1, 2), keepdim=True)) / torch.sqrt(
        band.var((1, 2), unbiased=False, keepdim=True) + layer.eps
    )
    torch.testing.assert_close(y[:, 3, 4:8, :], expected)
    assert not torch.allclose(y, F.instance_norm(x, eps=layer.eps), atol=1e-3)
