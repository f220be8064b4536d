"""How precise is the label -> flux emulator along the line-strength template?

The line-strength flag (bit 11) reads a common change c of every optical depth (flux
m -> m^(1+c)) as an amplitude a ~ c of a star's residuals along m ln m with the emulator's
label gradients projected out, against a variance v + tau^2: v from the star's noise, tau^2
the emulator's own misfit along that template (docs/outputs.md, *Shift flags*). A change c is
seen only where c^2 clears the flag threshold times v + tau^2, so tau says how precise the
emulator must be for the change the shift suite makes (c = 0.25).

This measures tau without noise or fitted labels: for new stars of the configuration's
generator, the emulator at their true labels against their noiseless spectra, weighted as a
star of SNR ``--snr`` would be, gives a = tau exactly (the residual is the emulator's error
alone); v is the noise variance along the same template at that SNR. Per group of stars
(metal-poor, [Fe/H] < -1; hot, Teff > 6000 K and [Fe/H] >= -1; the rest): the RMS of tau, the
median noise sqrt(v), and the share of stars whose ``LINES_LIMIT`` at that SNR, sqrt(threshold
(v + tau^2)) with the run's line-strength threshold, is below 0.25 (the change of the shift
suite's line strengths x1.25). The statistic subtracts the misfit's local mean (a local
line through the training stars nearest a star's labels,
:class:`~pipeline.evaluation.emulator.StrengthMisfit`), so a second row for the run's
emulator measures tau less that mean, the part that hides a change. With ``--train``, the
same emulator fitted to the noiseless spectra of the training labels too: its approximation
error alone, without the training spectra's noise; with ``--neural-steps``, a Payne-style
network (labels -> flux, three hidden layers of ``--neural-width`` SiLU units, Adam on the
inverse-variance weighted squared error of the training spectra, cosine-decayed learning
rate; :class:`NeuralEmulator`) trained for that many steps, an emulator of another kind on
the same stars. Synthetic data only (the generator gives the noiseless spectra).

    PYTHONPATH=. python -m benchmarks.emulator_precision --model-dir results/model \
        [--train results/data/train.fits [--neural-steps 20000 --neural-width 384]] \
        [--n 600] [--snr 100] [--configfile config/config.yaml]

(the model directory's ``emulator.npz`` and wavelength grid ``wave.npy``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.evaluation.shift import lines_limit
from pipeline.spectra import synthetic

SEED = 2718
"""Seed of the new stars' labels (not a split of any run)."""


def groups(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of the star groups over labels (N, 3): Teff, log g, [Fe/H]."""
    teff, feh = labels[:, 0], labels[:, 2]
    return {"metal-poor": feh < -1.0, "hot": (teff > 6000.0) & (feh >= -1.0),
            "rest": (teff <= 6000.0) & (feh >= -1.0)}


def template_misfit(emulator, labels: np.ndarray, wave: np.ndarray,
                    snr: float) -> tuple[np.ndarray, np.ndarray]:
    """(N,) each: the emulator's misfit tau along the line-strength template at ``labels``
    (N, 3), against the noiseless generator spectra, and the noise standard deviation
    sqrt(v) along it at ``snr`` (flux errors as the generator draws them)."""
    truth = synthetic.synthesize(labels, wave, np.float64)
    flux_err = synthetic.error_pattern(wave) * np.sqrt(np.maximum(truth, 0.0)) / snr
    good = flux_err > 0
    amplitude, variance = emulator.strength_amplitudes(truth, flux_err, good, labels)
    return amplitude, np.sqrt(variance)


def noiseless_refit(emulator_cfg: dict, train, good: np.ndarray, seed: int):
    """The emulator of ``emulator_cfg`` fitted to the noiseless spectra of ``train``'s labels."""
    from pipeline.evaluation.shift import configured_emulator

    labels = train.label_array().astype(np.float64)
    return configured_emulator(labels, synthetic.synthesize(labels, train.wave), train.flux_err,
                               good, emulator_cfg, seed)


class NeuralEmulator:
    """A label -> flux network trained on spectra, with the methods the benchmark needs.

    z = standardized labels, m(z) = MLP(z) (three hidden SiLU layers, linear output per
    pixel), trained with Adam on sum_p w_np (f_np - m_p(z_n))^2, w_np = g_np / (e_np^2 + FLOOR^2)
    scaled to mean 1 (the floor keeps saturated line cores, flux and error near 0, from taking
    over), the learning rate cosine-decayed from 2e-3 over ``steps`` batches of 256. Its
    intrinsic scatter s_p is the polynomial emulator's moment estimate over the training
    residuals (with its floor), so both are weighted alike; label gradients by forward-mode
    differentiation (one pass per label)."""

    def __init__(self, train, good: np.ndarray, steps: int, width: int, seed: int):
        import keras
        import tensorflow as tf

        from pipeline.evaluation.emulator import FLOOR, intrinsic_scatter2

        labels = train.label_array().astype(np.float64)
        self.label_mean, self.label_scale = labels.mean(axis=0), labels.std(axis=0)
        z = self.standardize(labels).astype(np.float32)
        flux = np.where(good, train.flux, 1.0).astype(np.float32)
        err2 = np.where(good, np.asarray(train.flux_err, np.float64) ** 2, 0.0)
        weight = np.where(good, 1.0 / (err2 + FLOOR**2), 0.0).astype(np.float32)
        weight /= weight.mean()
        n_pixels = flux.shape[1]
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((z.shape[1],))
        hidden = inputs
        for _ in range(3):
            hidden = keras.layers.Dense(width, activation="silu")(hidden)
        self.net = keras.Model(inputs, keras.layers.Dense(n_pixels)(hidden))

        def weighted_squares(target, emulated):  # target: flux and weights side by side
            return tf.reduce_mean(target[:, n_pixels:] * tf.square(target[:, :n_pixels]
                                                                   - emulated), axis=-1)

        schedule = keras.optimizers.schedules.CosineDecay(2e-3, steps, alpha=0.01)
        self.net.compile(keras.optimizers.Adam(schedule), loss=weighted_squares)
        batches = (tf.data.Dataset.from_tensor_slices((z, np.concatenate([flux, weight], 1)))
                   .shuffle(len(z), seed=seed).repeat().batch(256))
        self.net.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
        resid = flux - self.net.predict(z, batch_size=1024, verbose=0)
        self.scatter = np.sqrt(intrinsic_scatter2(resid, err2, good, 1))

    def standardize(self, labels: np.ndarray) -> np.ndarray:
        return (np.asarray(labels, np.float64) - self.label_mean) / self.label_scale

    def flux_and_gradient(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Emulated spectra (N, P) and d flux / d z (N, L, P), float64."""
        import tensorflow as tf

        z = tf.constant(self.standardize(labels), tf.float32)
        columns = []
        for label in range(z.shape[1]):
            with tf.autodiff.ForwardAccumulator(z, tf.one_hot([label] * len(labels),
                                                              z.shape[1])) as acc:
                emulated = self.net(z)
            columns.append(acc.jvp(emulated).numpy())
        return emulated.numpy().astype(np.float64), np.stack(columns, 1).astype(np.float64)

    def strength_amplitudes(self, flux, flux_err, good, labels) -> np.ndarray:
        """(2, N): amplitude along the line-strength template and its noise variance, as
        :meth:`pipeline.evaluation.emulator.LabelEmulator.strength_amplitudes` gives them."""
        from pipeline.evaluation.emulator import Residuals

        model, gradient = self.flux_and_gradient(labels)
        return np.stack(Residuals(flux, np.asarray(flux_err) ** 2, good, model,
                                  self.scatter**2, gradient).strength_amplitude())


def report(name: str, tau: np.ndarray, noise: np.ndarray, threshold: float,
           masks: dict[str, np.ndarray]) -> str:
    """One line per emulator: per group the RMS tau, the median noise sqrt(v) and the share
    of stars with a line-strength limit below 0.25 at ``threshold`` (in units of CHI2_LINES)."""
    limit = lines_limit(noise**2 + tau**2, threshold)
    cells = [f"{g} (n={m.sum()}): tau {np.sqrt(np.nanmean(tau[m] ** 2)):.4f}, noise "
             f"{np.nanmedian(noise[m]):.4f}, limit < 0.25 {np.mean(limit[m] < 0.25):.0%}"
             for g, m in masks.items() if m.any()]
    return f"{name:24s} " + "; ".join(cells)


def main(argv=None) -> int:
    from pipeline.artifacts.model_dir import WAVE_FILE, load_wave
    from pipeline.config import load_config
    from pipeline.evaluation.shift import EMULATOR_FILE, ShiftReference

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, type=Path,
                        help="a run's model directory (emulator.npz, wave.npy)")
    parser.add_argument("--train", default=None,
                        help="the run's training split: also fit the emulator to its noiseless "
                             "spectra")
    parser.add_argument("--neural-steps", type=int, default=0,
                        help="with --train: also a neural emulator trained for these steps")
    parser.add_argument("--neural-width", type=int, default=384, help="its hidden units")
    parser.add_argument("--n", type=int, default=600, help="new stars")
    parser.add_argument("--snr", type=float, default=100.0, help="SNR of the weights")
    parser.add_argument("--configfile", default=None)
    args = parser.parse_args(argv)
    cfg = load_config(args.configfile)
    wave = load_wave(args.model_dir / WAVE_FILE)
    labels = synthetic.sample_labels(args.n, np.random.default_rng(SEED), cfg["data"])
    masks = groups(labels)
    print(f"emulator misfit tau along the line-strength template, {args.n} new stars, "
          f"weights of SNR {args.snr:g} (a change c of the optical depths is an amplitude c)")
    reference = ShiftReference.load(args.model_dir / EMULATOR_FILE)
    lines = reference.residuals["CHI2_LINES"]
    threshold = float(lines.threshold * lines.trend(np.array([args.snr]))[0])
    print(f"line-strength threshold at SNR {args.snr:g}: {threshold:.2f} (the run's)")
    emulator = reference.emulator
    tau, noise = template_misfit(emulator, labels, wave, args.snr)
    mean = emulator.strength_misfit.moments(emulator.standardize(labels))[0]
    print(report("run's emulator", tau, noise, threshold, masks))
    print(report("less its local mean", tau - mean, noise, threshold, masks), flush=True)
    emulators = {}
    if args.train:
        from pipeline.spectra.inputs import read_labelled_on_grid
        from pipeline.spectra.validation import bad_pixel_mask

        train, = read_labelled_on_grid((args.train,), wave, cfg)
        good = ~bad_pixel_mask(train, cfg["data"]["bad_pixel_err"])
        emulators["fitted without noise"] = noiseless_refit(cfg["emulator"], train, good,
                                                            cfg["seed"])
        if args.neural_steps > 0:
            emulators[f"neural, {args.neural_steps} steps"] = NeuralEmulator(
                train, good, args.neural_steps, args.neural_width, cfg["seed"])
    for name, emulator in emulators.items():
        print(report(name, *template_misfit(emulator, labels, wave, args.snr), threshold, masks),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
