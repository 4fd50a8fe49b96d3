"""The epoch-seeded training order and the loaders' worker-seed generator (normlightning.data.samplers).

Each order is checked against ``torch.randperm`` drawn from the seed written out here in arithmetic form:
``(seed mod 2**32) * 2**31 XOR (epoch mod 2**30) * 2 XOR stream``, modulo ``2**63`` (stream 0: the
sampler's permutation, stream 1: the loader's generator).
"""

from __future__ import annotations

import pytest
import torch

from normlightning.data.samplers import EpochSeededRandomSampler, global_seed, seeded_loader_generator


def expected_seed(seed: int, epoch: int, stream: int) -> int:
    return ((seed % 2**32) * 2**31 ^ (epoch % 2**30) * 2 ^ stream) % 2**63


def permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("seed", [12345, 2**33 - 1])  # 2**33 - 1: only its low 32 bits count
@pytest.mark.parametrize("epoch", [3, 2**31 - 1])  # 2**31 - 1: only its low 30 bits count
def test_order_is_the_permutation_of_seed_and_epoch(seed, epoch):
    sampler = EpochSeededRandomSampler(range(10), seed=seed)
    sampler.set_epoch(epoch)
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(1)  # the global random state plays no part
    assert list(sampler) == first == permutation(10, expected_seed(seed, epoch, 0))
    assert sampler.epoch == epoch


def test_a_new_sampler_starts_at_epoch_zero():
    assert list(EpochSeededRandomSampler(range(10), seed=7)) == permutation(10, expected_seed(7, 0, 0))


def test_set_epoch_reseeds_the_loader_generator():
    generator = torch.Generator().manual_seed(123)
    sampler = EpochSeededRandomSampler(range(4), seed=9, loader_generator=generator)
    sampler.set_epoch(2)
    assert generator.initial_seed() == expected_seed(9, 2, 1)
    sampler.set_epoch(5)
    assert generator.initial_seed() == expected_seed(9, 5, 1)


def test_seeds_default_to_the_global_seed(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    assert global_seed() == 11
    assert EpochSeededRandomSampler(range(3)).seed == 11
    assert seeded_loader_generator().initial_seed() == expected_seed(11, 0, 1)
    assert seeded_loader_generator(4).initial_seed() == expected_seed(4, 0, 1)
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert global_seed() == 0
    assert EpochSeededRandomSampler(range(3)).seed == 0
    assert seeded_loader_generator().initial_seed() == expected_seed(0, 0, 1) == 1
