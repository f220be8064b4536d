"""Process-wide runtime settings of a step: seeds, determinism, threads, the device.

Every TensorFlow step calls :func:`configure` first, so that

* TensorFlow's C++ start-up messages (CUDA probing on a CPU machine, oneDNN notes) stay out
  of the logs: they read like errors and are not;
* ``threads`` (Snakemake's ``{threads}``) bounds TensorFlow's intra- and inter-op thread
  pools, so jobs that Snakemake runs side by side do not oversubscribe the cores;
* seeds and op determinism come from the config.

:func:`device_name` is the one name of the compute device written into provenance.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

from pipeline.exceptions import ConfigError

DEVICES = ("auto", "cpu", "gpu")
SHOW_STARTUP = "STELLAR_LAPLACE_TF_STARTUP_LOGS"  # set to 1 to see TensorFlow's start-up lines


@contextlib.contextmanager
def _quiet_native_stderr():
    """Send what C++ code writes to file descriptor 2 to /dev/null for the block.

    TensorFlow's CUDA probing prints through absl before its logging is initialized, so
    TF_CPP_MIN_LOG_LEVEL does not hide it. Python exceptions are unaffected: they are raised,
    and printed, after the descriptor is restored.
    """
    if os.environ.get(SHOW_STARTUP):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # INFO and WARNING of the C++ runtime
with _quiet_native_stderr():
    import keras
    import tensorflow as tf

    from pipeline.nn.derivatives import set_jit_compile  # imports TensorFlow too


def set_threads(threads: int | None) -> None:
    """Use at most ``threads`` threads for TensorFlow ops (None: TensorFlow's default).

    Must run before TensorFlow executes its first op; later calls are ignored by TensorFlow,
    which raises, so a second call with the same value is a no-op here.
    """
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads}")
    threading = tf.config.threading
    if threading.get_intra_op_parallelism_threads() == threads:
        return
    try:
        threading.set_intra_op_parallelism_threads(threads)
        threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime is already initialized: keep what it has
        pass


def cpu_threads() -> int:
    """Threads a step may use for its NumPy work: TensorFlow's intra-op pool size when
    :func:`set_threads` bounded it, else the CPUs this process may run on."""
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    if threads > 0:
        return threads
    if hasattr(os, "sched_getaffinity"):  # Linux: the CPUs a batch scheduler granted
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def seed_everything(config: dict) -> None:
    """Seed Python, NumPy and TensorFlow from config ``seed``; op determinism if configured."""
    keras.utils.set_random_seed(int(config["seed"]))
    if config.get("deterministic", True):
        tf.config.experimental.enable_op_determinism()


@functools.cache
def gpu_visible() -> bool:
    """Whether TensorFlow sees a GPU.

    The first call initializes TensorFlow's runtime (CUDA probing included) with its native
    start-up messages hidden; thread-pool sizes must be set before it (:func:`configure`).
    """
    with _quiet_native_stderr():
        tf.zeros(()).numpy()  # the first op starts the runtime
        return bool(tf.config.list_logical_devices("GPU"))


def configure(config: dict, threads: int | None = None) -> None:
    """Thread pools, seeds and determinism of a step, before its first TensorFlow op, and
    whether its Jacobian pass is XLA-compiled (config ``inference_jit``)."""
    with _quiet_native_stderr():  # whichever call starts the runtime, CUDA probing is quiet
        set_threads(threads)
        gpu_visible()
        seed_everything(config)
    jit = config.get("inference_jit", "auto")
    set_jit_compile(not gpu_visible() if jit == "auto" else jit)


def device_name() -> str:
    """'GPU' when TensorFlow sees a GPU (it then computes there), else 'CPU'."""
    return "GPU" if gpu_visible() else "CPU"


def choose_device(device: str = "auto", key: str = "laplace.device") -> str:
    """'gpu' if requested or auto and TensorFlow sees a GPU, else 'cpu'."""
    if device not in DEVICES:
        raise ConfigError(f"config key '{key}' = {device!r}; valid: {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    if gpu_visible():
        return "gpu"
    if device == "gpu":
        raise ConfigError(f"config key '{key}' = gpu but TensorFlow sees no GPU; use auto")
    return "cpu"
