"""The numbers file of a paper: one LaTeX ``\\newcommand`` per quoted number.

    % provenance: PKGVERS = 0.1.0
    \\newcommand{\\TeffRMSETest}{62\\,K}

A manuscript ``\\input``s the file and writes ``\\TeffRMSETest`` where it quotes the number, so
text and results cannot drift apart. Values are plain LaTeX text that a bare install compiles
(no siunitx): a thin space ``\\,`` before the unit, ``\\%`` for percent, ``$-$`` for a minus
sign, ``\\_`` for an underscore. Macro names are letters only (TeX control words cannot hold
digits or underscores), each defined exactly once; :func:`read_numbers` checks both.

Rounding: :func:`significant` keeps ``digits`` significant figures without switching to
exponent notation (1234.5 -> '1200' at 2 digits), :func:`fixed` a fixed number of decimals.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from pipeline.artifacts.atomic import atomic_path
from pipeline.exceptions import DataError

DIGIT_WORDS = ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine")
MACRO = re.compile(r"\\newcommand\{\\(?P<name>[^}]*)\}\{(?P<value>.*)\}\s*")
TEXT = {"$-$": "-", "\\,": " ", "\\%": "%", "\\_": "_", "\\&": "&", "\\#": "#"}


def macro_name(*parts: str) -> str:
    """A TeX control word from name parts: ('Teff', 'RMSE', 'test') -> 'TeffRMSETest'.

    In each part every run of letters keeps its case with the first letter capitalized and
    every digit is spelled out ('run-2' -> 'RunTwo'): control words are letters only.
    """
    words = []
    for part in parts:
        for token in re.findall(r"[A-Za-z]+|\d", str(part)):
            words.append(DIGIT_WORDS[int(token)] if token.isdigit()
                         else token[0].upper() + token[1:])
    if not words:
        raise ValueError(f"no letters or digits in the macro name parts {parts!r}")
    return "".join(words)


def _signed(text: str, plus: bool) -> str:
    if text.startswith("-"):
        return "$-$" + text[1:]
    return ("+" + text) if plus else text


def significant(value: float, digits: int = 2, *, plus: bool = False) -> str:
    """``value`` rounded to ``digits`` significant figures, positional notation, TeX minus."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"cannot quote the non-finite number {value}")
    if value == 0:
        return _signed("0", plus)
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    rounded = round(value, decimals)
    if rounded != 0 and math.floor(math.log10(abs(rounded))) > math.floor(math.log10(abs(value))):
        decimals -= 1  # 9.96 -> 10 at 2 digits, not 10.0
    text = f"{rounded:.{max(decimals, 0)}f}"
    return _signed(text, plus)


def fixed(value: float, decimals: int, *, plus: bool = False) -> str:
    """``value`` with ``decimals`` decimals, TeX minus sign; '+' prefix with ``plus``."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"cannot quote the non-finite number {value}")
    text = f"{value:.{decimals}f}"
    if float(text) == 0:
        return text.lstrip("-")  # no sign on a rounded zero: '-0.00' and '+0.00' read wrong
    return _signed(text, plus)


def with_unit(number: str, unit: str) -> str:
    """Number and unit separated by a thin space ('62\\,K'); '%' becomes '\\%'."""
    if unit == "%":
        return number + "\\%"
    return f"{number}\\,{unit}" if unit else number


def escape(text: str) -> str:
    """Plain text (a version, a config name) as LaTeX text."""
    for char in "\\{}$^~":
        if char in str(text):
            raise ValueError(f"'{text}' holds '{char}', which a numbers file cannot quote")
    return re.sub(r"([_%&#])", r"\\\1", str(text))


def tex_to_text(value: str) -> str:
    """The text a reader sees for a macro value ('$-$1.3\\,K' -> '-1.3 K')."""
    for tex, text in TEXT.items():
        value = value.replace(tex, text)
    return value


def render_numbers(numbers: dict[str, str], header: dict[str, str]) -> str:
    """The text of a numbers file: ``header`` as comment lines, then one macro per line."""
    lines = ["% Numbers quoted in the paper; generated, do not edit.",
             "% \\input{numbers} in a manuscript, then e.g. \\TeffRMSETest."]
    lines += [f"% {key} = {value}" for key, value in header.items()]
    for name, value in numbers.items():
        if not re.fullmatch(r"[A-Za-z]+", name):
            raise ValueError(f"macro name '{name}' is not letters only")
        lines.append(f"\\newcommand{{\\{name}}}{{{value}}}")
    return "\n".join(lines) + "\n"


def write_numbers(path: str | Path, numbers: dict[str, str], header: dict[str, str]) -> Path:
    """Write the numbers file atomically (a dict cannot hold a name twice)."""
    path = Path(path)
    text = render_numbers(numbers, header)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def parse_numbers(text: str, source: str = "numbers file") -> dict[str, str]:
    """Macro name -> value of every ``\\newcommand`` line; comment lines are skipped.

    Raises DataError naming the line for a malformed definition, a name that is not letters
    only, unbalanced braces in a value, or a name defined twice.
    """
    numbers: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("%"):
            continue
        match = MACRO.fullmatch(stripped)
        where = f"'{source}' line {lineno}"
        if match is None:
            raise DataError(f"{where}: '{stripped}' is not a \\newcommand{{\\Name}}{{value}} "
                            "line; regenerate the file with `python -m pipeline.steps.paper`")
        name, value = match["name"], match["value"]
        if not re.fullmatch(r"[A-Za-z]+", name):
            raise DataError(f"{where}: macro name '{name}' is not letters only")
        depth = 0
        for char in re.sub(r"\\[{}]", "", value):
            depth += {"{": 1, "}": -1}.get(char, 0)
            if depth < 0:
                break
        if depth != 0:
            raise DataError(f"{where}: unbalanced braces in the value of \\{name}")
        if name in numbers:
            raise DataError(f"{where}: \\{name} is defined a second time")
        numbers[name] = value
    return numbers


def read_numbers(path: str | Path) -> dict[str, str]:
    """:func:`parse_numbers` of the file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"'{path}': cannot read the numbers file ({exc.strerror}); run "
                        "`snakemake paper` to make it") from None
    return parse_numbers(text, str(path))
