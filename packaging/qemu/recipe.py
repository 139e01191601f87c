"""The shared recipe of the project's QEMU: which configure options and patches apply
to an upstream QEMU version. Read by scripts/build-qemu and the tests; the EL9 spec
(vdsm-ft-qemu.spec) applies the same rules in its Lua. Standard library only.

Both `configure-options` and `patches/series` hold one item a line. `#` starts a
comment; a trailing `# qemu <op> X.Y` (op one of < <= > >=) limits the item to the
upstream versions for which it holds. Any other trailing comment is an error, so a
mistyped condition cannot silently apply an item everywhere.
"""
from __future__ import annotations

import operator
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPTIONS_FILE = HERE / "configure-options"
PATCHES_DIR = HERE / "patches"
SERIES_FILE = PATCHES_DIR / "series"

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_CONDITION = re.compile(r"^qemu\s*(<=|>=|<|>)\s*(\d+(?:\.\d+)*)$")


class RecipeError(ValueError):
    """A malformed line in configure-options or series."""


def version_tuple(version: str) -> tuple[int, ...]:
    """`"7.2.22"` -> `(7, 2, 22)`; the upstream version, as in QEMU's VERSION file."""
    if not re.fullmatch(r"\d+(?:\.\d+)*", version):
        raise RecipeError(f"not an upstream QEMU version: {version!r} (expected e.g. 7.2.22)")
    return tuple(int(part) for part in version.split("."))


def _holds(condition: str, version: tuple[int, ...], where: str) -> bool:
    match = _CONDITION.match(condition.strip())
    if not match:
        raise RecipeError(f"{where}: trailing comment {condition!r} is not a condition "
                          "like '# qemu < 9.0'; put plain comments on their own line")
    op, bound_text = match.groups()
    bound = version_tuple(bound_text)
    # Padded to one length, so that 9.0 compares equal to 9.0.0.
    width = max(len(version), len(bound))
    return _OPS[op](version + (0,) * (width - len(version)), bound + (0,) * (width - len(bound)))


def selected(path: Path, version: str) -> list[str]:
    """The items of `path` that apply to upstream QEMU `version`, in file order."""
    wanted = version_tuple(version)
    items = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        item, _, condition = line.partition("#")
        item = item.strip()
        if condition and not _holds(condition, wanted, f"{path}:{number}"):
            continue
        items.append(item)
    return items


def configure_options(version: str) -> list[str]:
    return selected(OPTIONS_FILE, version)


def patches(version: str) -> list[Path]:
    found = []
    for name in selected(SERIES_FILE, version):
        patch = PATCHES_DIR / name
        if not patch.is_file():
            raise RecipeError(f"{SERIES_FILE} names {name}, which is not in {PATCHES_DIR}")
        found.append(patch)
    return found
