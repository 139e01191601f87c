"""VDSM's hook protocol, through `vdsm.hook.hooking` when VDSM is installed
(docs/decisions.md, D6).

VDSM puts its hook directory on PYTHONPATH, so the module imports as `hooking`. Without
VDSM (CI, the lab's VDSM stand-in) the same protocol is spoken here: the domain XML is
in the file named by `_hook_domxml`, messages go to stderr (VDSM logs them), and the exit
code is 0 (ok), 1 (failed, run the other scripts) or 2 (failed, stop).
docs/ovirt-facts.md, "How VDSM runs hooks".
"""
from __future__ import annotations

import os
import sys

try:
    import hooking as _vdsm
except ImportError:
    _vdsm = None

OK = 0
FAILED_CONTINUE = 1
FAILED_STOP = 2
DOMXML_ENV = "_hook_domxml"


def read_domxml() -> str:
    """The domain XML VDSM handed to this hook, as text."""
    if _vdsm is not None:
        return _vdsm.read_domxml().toxml()
    with open(os.environ[DOMXML_ENV], "rb") as f:
        return f.read().decode("utf-8")


def write_domxml(xml: str) -> None:
    """Replace the domain XML VDSM will use."""
    if _vdsm is not None:
        from xml.dom import minidom
        _vdsm.write_domxml(minidom.parseString(xml.encode("utf-8")))
        return
    with open(os.environ[DOMXML_ENV], "wb") as f:
        f.write(xml.encode("utf-8"))


def log(message: str) -> None:
    """A line for vdsm.log (VDSM logs each hook's stderr)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
