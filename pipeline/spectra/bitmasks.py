"""APOGEE bitmasks of SDSS DR17: bit numbers by name, and name lists to integer masks.

The tables are those of the SDSS DR17 bitmask documentation
(https://www.sdss4.org/dr17/irspec/apogee-bitmasks): ``APOGEE_PIXMASK`` (per pixel, apStar
HDU 3), ``APOGEE_STARFLAG`` and ``APOGEE_ASPCAPFLAG`` (per star, allStar columns STARFLAG and
ASPCAPFLAG; ASPCAPFLAG is 64-bit) and ``APOGEE2_EXTRATARG`` (allStar column EXTRATARG). The
configuration names bits, never numbers, so a cut reads as what it removes.
"""

from __future__ import annotations

import numpy as np

from pipeline.exceptions import ConfigError


def _table(names: str) -> dict[str, int]:
    """Bit numbers of a whitespace-separated name list in bit order; '-' is an unused bit."""
    return {name: bit for bit, name in enumerate(names.split()) if name != "-"}


PIXMASK = _table("BADPIX CRPIX SATPIX UNFIXABLE BADDARK BADFLAT BADERR NOSKY LITTROW_GHOST "
                 "PERSIST_HIGH PERSIST_MED PERSIST_LOW SIG_SKYLINE SIG_TELLURIC NOT_ENOUGH_PSF "
                 "- FERRE_MASK")
STARFLAG = _table("BAD_PIXELS COMMISSIONING BRIGHT_NEIGHBOR VERY_BRIGHT_NEIGHBOR LOW_SNR - - - - "
                  "PERSIST_HIGH PERSIST_MED PERSIST_LOW PERSIST_JUMP_POS PERSIST_JUMP_NEG - - "
                  "SUSPECT_RV_COMBINATION SUSPECT_BROAD_LINES BAD_RV_COMBINATION RV_REJECT "
                  "RV_SUSPECT MULTIPLE_SUSPECT RV_FAIL SUSPECT_ROTATION MTPFLUX_LT_75 "
                  "MTPFLUX_LT_50")
ASPCAPFLAG = _table("TEFF_WARN LOGG_WARN VMICRO_WARN M_H_WARN ALPHA_M_WARN C_M_WARN N_M_WARN "
                    "STAR_WARN CHI2_WARN COLORTE_WARN ROTATION_WARN SN_WARN SPEC_HOLE_WARN "
                    "ATMOS_HOLE_WARN VSINI_WARN - TEFF_BAD LOGG_BAD VMICRO_BAD M_H_BAD "
                    "ALPHA_M_BAD C_M_BAD N_M_BAD STAR_BAD CHI2_BAD COLORTE_BAD ROTATION_BAD "
                    "SN_BAD SPEC_HOLE_BAD ATMOS_HOLE_BAD VSINI_BAD NO_ASPCAP_RESULT "
                    "MISSING_APSTAR NO_GRID BAD_FRAC_LOWSNR BAD_FRAC_BADPIX FERRE_FAIL - - - "
                    "PROBLEM_TARGET MULTIPLE_SUSPECT")
EXTRATARG = _table("NOT_MAIN COMMISSIONING TELLURIC APO1M DUPLICATE")

MASKS = {"APOGEE_PIXMASK": PIXMASK, "APOGEE_STARFLAG": STARFLAG,
         "APOGEE_ASPCAPFLAG": ASPCAPFLAG, "APOGEE2_EXTRATARG": EXTRATARG}


def mask_value(mask: str, names, key: str) -> np.uint64:
    """OR of ``2**bit`` over ``names`` of bitmask ``mask``; ConfigError naming ``key`` for an
    unknown name."""
    table = MASKS[mask]
    value = 0
    for name in names:
        if name not in table:
            raise ConfigError(f"config key '{key}': '{name}' is not a {mask} bit (valid names: "
                              f"{', '.join(table)})")
        value |= 1 << table[name]
    return np.uint64(value)


def has_bits(flags, value: np.uint64) -> np.ndarray:
    """Boolean array: which entries of the integer array ``flags`` have any bit of ``value``."""
    return (np.asarray(flags).astype(np.uint64) & value) != 0
