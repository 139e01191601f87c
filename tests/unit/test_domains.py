"""domains.destroy when libvirt's domain goes away under it."""
from __future__ import annotations

import libvirt
import pytest

from vdsm_ft import domains


def _error(code: int) -> libvirt.libvirtError:
    exc = libvirt.libvirtError("failed")
    exc.err = (code, 0, "libvirt says no", 0, "", None, None, 0, 0)
    return exc


class _Dom:
    def __init__(self, destroy_code: int, active: bool | int):
        self.destroy_code, self.active = destroy_code, active

    def name(self) -> str:
        return "vm1-ft-secondary"

    def destroy(self) -> None:
        raise _error(self.destroy_code)

    def isActive(self) -> int:
        if self.active is libvirt.VIR_ERR_NO_DOMAIN:
            raise _error(libvirt.VIR_ERR_NO_DOMAIN)
        return int(bool(self.active))


class _Conn:
    def __init__(self, dom: _Dom):
        self.dom = dom

    def lookupByName(self, name: str) -> _Dom:
        return self.dom


def test_a_domain_that_vanished_between_lookup_and_destroy_is_destroyed():
    """The agent kills QEMU and then destroys the domain: libvirt may drop the transient
    domain in between. The nemesis soak saw that answered as a 500 to prepare-secondary."""
    for dom in (_Dom(libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_DOMAIN),
                _Dom(libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN),
                _Dom(libvirt.VIR_ERR_OPERATION_INVALID, False)):
        assert domains.destroy(_Conn(dom), "vm1-ft-secondary")


def test_a_domain_still_running_after_a_failed_destroy_is_an_error():
    with pytest.raises(domains.DomainError, match="cannot destroy vm1-ft-secondary: "
                                                  "libvirt says no"):
        domains.destroy(_Conn(_Dom(libvirt.VIR_ERR_SYSTEM_ERROR, True)), "vm1-ft-secondary")
