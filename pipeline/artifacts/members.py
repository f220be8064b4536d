"""Where the members of an ensemble live and how each is seeded: one place for the paths.

With ``ensemble.members`` M = 1 (the default) the one network and its posterior keep the
single-model paths and the config seed, unchanged:

    results/model/                     the model directory (pipeline.artifacts.model_dir)
    results/laplace/posterior.npz      its Laplace posterior (pipeline.artifacts.posterior_file)

With M > 1, member m = 0..M-1 is trained and fitted independently (its own Snakemake jobs) in

    results/model/member-{m}/
    results/laplace/member-{m}/posterior.npz

and the mixture's own scatter model, fitted once every member is done, is

    results/laplace/ensemble_scatter.npz  (pipeline.artifacts.ensemble_scatter)

Member m's seed (weight initialization, shuffling, every random draw of its train and laplace
steps) is ``member_seed(seed, m)``: the first 32-bit word of
``numpy.random.SeedSequence([seed, ENSEMBLE_STREAM, m])``. SeedSequence hashes the whole entropy
list, so members get statistically independent streams, distinct from each other and from the
single model's seed; the data (generated from ``seed`` alone) are the same for every member.
The seed does not depend on M, so growing an ensemble keeps the members already trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ENSEMBLE_STREAM = 0x454E53  # 'ENS': keeps member streams apart from other [seed, ...] streams
MEMBER_DIR = "member-{member}"
ENSEMBLE_SCATTER_FILE = "ensemble_scatter.npz"


def member_seed(seed: int, members: int, member: int) -> int:
    """Seed of ensemble member ``member`` of ``members``; the config ``seed`` when M = 1."""
    if not 0 <= member < members:
        raise ValueError(f"member {member} is not in 0..{members - 1} (ensemble.members = "
                         f"{members})")
    if members == 1:
        return int(seed)
    state = np.random.SeedSequence([int(seed), ENSEMBLE_STREAM, int(member)]).generate_state(1)
    return int(state[0])


def _member_part(members: int, member) -> str:
    return "" if members == 1 else "/" + MEMBER_DIR.format(member=member)


def model_dir(root: str, members: int, member="{member}") -> str:
    """Model directory of a member under results root ``root`` (a Snakemake pattern by default)."""
    return f"{root}/model{_member_part(members, member)}"


def posterior_path(root: str, members: int, member="{member}") -> str:
    """Posterior file of a member under results root ``root`` (a Snakemake pattern by default)."""
    return f"{root}/laplace{_member_part(members, member)}/posterior.npz"


def log_name(step: str, members: int, member="{member}") -> str:
    """Log and benchmark file stem of a member's train or laplace job, e.g. ``train`` or
    ``train/member-0``."""
    return step + _member_part(members, member)


def member_paths(root: str | Path, members: int) -> list[tuple[Path, Path]]:
    """(model directory, posterior file) of every member, member 0 first."""
    return [(Path(model_dir(str(root), members, m)), Path(posterior_path(str(root), members, m)))
            for m in range(members)]


def ensemble_scatter_path(root: str) -> str:
    """The ensemble's scatter file (``pipeline.artifacts.ensemble_scatter``), beside the
    members' posterior directories; only an ensemble (M > 1) has one."""
    return f"{root}/laplace/{ENSEMBLE_SCATTER_FILE}"
