"""Recycling of dormant ReLU units between epochs (ReDo: Sokar et al. 2023, "The Dormant Neuron
Phenomenon in Deep Reinforcement Learning").

A ReLU unit whose input stays negative on every training star outputs 0 and receives no
gradient, so once dead it never recovers: trained with Adam at the reference learning rate the
default network lost three quarters of the units of its second hidden layer and over half of
its last one, and how many survived changed by several units with any change of the recipe.
After each epoch but the last, the units of every hidden Dense layer followed by a Dense layer
that are zero on all ``PROBE_STARS`` training stars (a fixed seeded subset) are recycled:

* their incoming weights are drawn afresh from the layer's he_normal initializer and their
  biases set to minus the median of the new pre-activations over the probe stars, so each
  fires on half of them (with a zero bias, ReDo's choice, w . x would keep the sign of
  w . mean(x) for most stars, since the inputs of a hidden layer are ReLU outputs with a
  large common mean);
* their outgoing weights (the rows of the next layer's kernel) are set to 0, so the network's
  output, hence the loss, is unchanged by the recycling itself;
* Adam's first and second moments of all those weights are reset to 0, so stale moments do not
  push them at once.

The unit then learns from the next batch on (its outgoing weights get the gradient a * delta).
Draws come from the named random stream ``dormant`` keyed by the epoch, and the recycling runs
before the epoch's checkpoint is written, so a resumed run recycles as an uninterrupted one.
"""

from __future__ import annotations

import keras
import numpy as np

from pipeline.random_streams import random_stream, subset

PROBE_STARS = 1024


def dense_pairs(model) -> list[tuple]:
    """(layer, next) for each ReLU Dense layer of ``model`` whose output feeds the Dense layer
    ``next`` directly (the dense stack; the CNN's dense head)."""
    dense = [la for la in model.layers if isinstance(la, keras.layers.Dense)]
    pairs = []
    for layer, nxt in zip(dense[:-1], dense[1:], strict=True):
        if layer.activation is keras.activations.relu and nxt.input is layer.output:
            pairs.append((layer, nxt))
    return pairs


class DormantRecycler:
    """Callable ``(model, epoch) -> units recycled``, probing ``flux`` rows (array or row
    reader) of the training split."""

    def __init__(self, flux, seed: int):
        rows = subset(seed, "dormant_probe", len(flux), PROBE_STARS)
        self.probe_flux = np.asarray(flux[rows], np.float32)
        self.seed = int(seed)

    def probe(self, model, pairs) -> list[tuple[np.ndarray, np.ndarray]]:
        """(inputs (S, fan_in), outputs (S, units)) of each pair's layer on the probe stars."""
        tensors = [t for layer, _ in pairs for t in (layer.input, layer.output)]
        values = keras.Model(model.inputs[0], tensors).predict(self.probe_flux, batch_size=256,
                                                                verbose=0)
        return [(np.asarray(values[2 * i]), np.asarray(values[2 * i + 1]))
                for i in range(len(pairs))]

    def dormant(self, model, pairs) -> list[np.ndarray]:
        """(units,) bool per pair: the layer's units that are 0 on every probe star."""
        return [~(out > 0).any(axis=0) for _, out in self.probe(model, pairs)]

    def __call__(self, model, epoch: int) -> int:
        pairs = dense_pairs(model)
        if not pairs:
            return 0
        rng = np.random.default_rng(random_stream(self.seed, "dormant", epoch))
        total, recycled = 0, {}  # id(layer) -> its input after the layers before it recycled
        for (layer, nxt), (inputs, out) in zip(pairs, self.probe(model, pairs), strict=True):
            inputs = recycled.get(id(layer), inputs)
            dead = ~(out > 0).any(axis=0)
            if dead.any():
                recycle(model.optimizer, layer, nxt, np.flatnonzero(dead), inputs, rng)
                total += int(dead.sum())
            recycled[id(nxt)] = layer(inputs).numpy()
        return total


def recycle(optimizer, layer, nxt, units: np.ndarray, inputs: np.ndarray,
            rng: np.random.Generator) -> None:
    """Re-initialize ``units`` of ``layer`` given its ``inputs`` (S, fan_in) on the probe stars
    (module docstring) and zero their outgoing weights in ``nxt`` and the Adam moments of all
    of them."""
    kernel, bias = (np.array(v.numpy()) for v in (layer.kernel, layer.bias))
    fan_in = kernel.shape[0]
    # he_normal: a normal truncated at 2 standard deviations, scaled to variance 2 / fan_in
    draw = rng.standard_normal((fan_in, len(units)))
    while (out := np.abs(draw) > 2).any():
        draw[out] = rng.standard_normal(out.sum())
    kernel[:, units] = draw * np.sqrt(2.0 / fan_in) / 0.87962566103423978
    bias[units] = -np.median(inputs.astype(np.float64) @ kernel[:, units], axis=0)
    outgoing = np.array(nxt.kernel.numpy())
    outgoing[units, :] = 0.0
    for variable, value, index in ((layer.kernel, kernel, (slice(None), units)),
                                   (layer.bias, bias, units), (nxt.kernel, outgoing, units)):
        variable.assign(value.astype(variable.dtype))
        slot = optimizer._get_variable_index(variable)  # Adam's moments of this variable
        for moments in (optimizer._momentums, optimizer._velocities):
            reset = np.array(moments[slot].numpy())
            reset[index] = 0.0
            moments[slot].assign(reset)
