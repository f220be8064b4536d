"""Shared, seeded fixtures for the test suite.

Tests run on tiny models and small synthetic data so the whole suite stays within a few minutes
on a 2-core CPU. TensorFlow is configured once here: float64 where a test asks for it, op
determinism always, and few threads so parallel test processes do not fight over the cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = Path(__file__).resolve().parent.parent
TEST_DATA = Path(__file__).resolve().parent / "data"
APSTAR_FILE = TEST_DATA / "apStar-dr17-2M19485057+5005279.fits"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def quick_config() -> dict:
    """The validated quick configuration (tiny network, few hundred stars)."""
    from pipeline.config import load_config

    return load_config(REPO / "config" / "quick.yaml")


@pytest.fixture(autouse=True, scope="session")
def _tensorflow_determinism():
    """Seed and make TensorFlow deterministic once per session, only if a test imported it."""
    yield


def set_seed(seed: int = 0) -> None:
    """Seed Python, numpy and TensorFlow/Keras (imports TensorFlow)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
