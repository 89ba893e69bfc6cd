"""PseudoLabelCache: generations written aside, switched atomically, pruned; unknown where nothing is cached."""
import os

import numpy as np
import pytest

from nnunetv2_samssl.data.pseudo_label_cache import PseudoLabelCache, generation_name


def test_generations_switch_atomically_and_old_ones_are_pruned(tmp_path):
    cache = PseudoLabelCache(str(tmp_path / "cache"), unknown_label=3)
    shape = (4, 5, 6)
    # nothing published yet: every case reads as unknown (masked by the losses)
    empty = cache.load("a", shape)
    assert empty.shape == (1, *shape) and (np.asarray(empty) == 3).all()

    first = np.random.default_rng(0).integers(0, 4, shape)
    cache.write_case(generation_name(1), "a", first, patch_size=(4, 4, 4))
    assert cache.current_generation() is None  # staged, not visible
    assert (np.asarray(cache.load("a", shape)) == 3).all()
    cache.publish(generation_name(1))
    assert cache.current_generation() == "epoch_0001"
    np.testing.assert_array_equal(cache.load("a", shape)[:][0], first)
    assert (np.asarray(cache.load("b", shape)) == 3).all()  # a case the generation lacks

    second = (first + 1) % 4
    cache.write_case(generation_name(2), "a", second, patch_size=(4, 4, 4))
    np.testing.assert_array_equal(cache.load("a", shape)[:][0], first)  # readers keep the old one meanwhile
    cache.publish(generation_name(2))
    np.testing.assert_array_equal(cache.load("a", shape)[:][0], second)
    cache.write_case(generation_name(3), "a", first, patch_size=(4, 4, 4))
    cache.publish(generation_name(3))
    # the current and the previous generation stay (a reader may have opened it just before the switch)
    assert cache.generations() == ["epoch_0002", "epoch_0003"]
    cache.activate("epoch_0002")  # e.g. a resumed checkpoint trained with it
    np.testing.assert_array_equal(cache.load("a", shape)[:][0], second)
    with pytest.raises(RuntimeError, match="missing or incomplete"):
        cache.activate("epoch_0001")


def test_bad_values_and_foreign_shapes_are_errors(tmp_path):
    cache = PseudoLabelCache(str(tmp_path), unknown_label=2)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\]"):
        cache.write_case("epoch_0001", "a", np.full((2, 2, 2), 5), patch_size=(2, 2, 2))
    cache.write_case("epoch_0001", "a", np.zeros((2, 2, 2), dtype=np.int64), patch_size=(2, 2, 2))
    cache.publish("epoch_0001")
    with pytest.raises(RuntimeError, match="does not belong to this preprocessed data"):
        cache.load("a", (3, 3, 3))
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))
