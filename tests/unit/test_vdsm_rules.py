"""The VDSM stand-in's pure rules: what makes a domain external, its status at recovery,
the Paused overlay and the metadata VDSM cannot read (docs/engine-view.md)."""
import libvirt
import pytest

from ftlab import guest
from ftlab.vdsm import is_external, last_status, metadata_values, recover_status

XML = guest.idle_guest_xml("web-ft-secondary", "/images/d.qcow2")


def test_external_means_no_ovirt_metadata_whatever_the_name():
    assert not is_external(XML)                     # the name plays no part
    bare = "<domain><name>web</name><devices/></domain>"
    assert is_external(bare)
    legacy = ("<domain><name>web</name><devices><channel type='unix'><target type='virtio' "
              "name='com.redhat.rhevm.vdsm'/></channel></devices></domain>")
    assert not is_external(legacy)


@pytest.mark.parametrize("state,reason,outgoing,want", [
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED, False, "up"),
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED, True, "migrating_from"),
    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY, False, "migrating_to"),
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER, False, "paused"),
    (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION, False, "migrating_from"),
    (libvirt.VIR_DOMAIN_SHUTOFF, 0, False, "down"),
    (libvirt.VIR_DOMAIN_PMSUSPENDED, 0, False, "up"),
])
def test_recover_status(state, reason, outgoing, want):
    assert recover_status(state, reason, outgoing) == want


def test_cpus_stopped_show_paused_only_over_up():
    assert last_status("up", libvirt.VIR_DOMAIN_PAUSED) == "paused"
    assert last_status("up", libvirt.VIR_DOMAIN_RUNNING) == "up"
    assert last_status("paused", libvirt.VIR_DOMAIN_RUNNING) == "paused"
    assert last_status("migrating_from", libvirt.VIR_DOMAIN_PAUSED) == "migrating_from"


def test_typed_metadata_converts_or_fails():
    ns = 'xmlns:ovirt-vm="http://ovirt.org/vm/1.0"'
    good = (f'<domain {ns}><metadata><ovirt-vm:vm><ovirt-vm:memGuaranteedSize type="int">64'
            '</ovirt-vm:memGuaranteedSize><ovirt-vm:launchPaused>false</ovirt-vm:launchPaused>'
            '</ovirt-vm:vm></metadata></domain>')
    assert metadata_values(good) == {"memGuaranteedSize": 64, "launchPaused": "false"}
    with pytest.raises(ValueError):
        metadata_values(good.replace(">64<", ">lots<"))
