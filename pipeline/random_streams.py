"""Named random streams: one SeedSequence per use of randomness, all from the config ``seed``.

Every seeded draw of the pipeline that is not a training-epoch order takes its generator from
``np.random.default_rng(random_stream(seed, purpose, *key))``: the synthetic labels and noise of
each split, the split permutation, the subsets of training stars that the label weights and
the line-strength misfit are estimated on, and the probe stars and redrawn weights of dormant
units. New purposes are appended to ``STREAMS``, so the streams that exist keep their bits
(and the data they generate).
"""

from __future__ import annotations

import numpy as np

STREAMS = ("labels", "noise", "split", "label_weights", "strength_misfit", "dormant_probe",
           "dormant")


def random_stream(seed: int, purpose: str, *key: int) -> np.random.SeedSequence:
    """The SeedSequence of one use of randomness: entropy ``seed``, spawn key
    (1 + index of ``purpose``, *key).

    Each purpose has its own leading spawn-key word, so no two streams coincide. (Entropy
    tuples would not do: numpy pads entropy shorter than its pool with zeros, so ``[seed, s]``
    and ``[seed, s, 0]`` are the same SeedSequence and would share their random bits.)
    """
    return np.random.SeedSequence(seed, spawn_key=(1 + STREAMS.index(purpose), *key))


def subset(seed: int, purpose: str, n: int, size: int) -> np.ndarray:
    """Sorted indices of ``min(size, n)`` of ``n`` rows drawn without replacement from the
    stream ``purpose``."""
    rng = np.random.default_rng(random_stream(seed, purpose))
    return np.sort(rng.permutation(n)[:min(size, n)])
