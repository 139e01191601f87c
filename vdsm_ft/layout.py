"""The names both COLO roles share: block nodes, chardevs, filters and sockets.

`domxml` writes these names into the domain XML and `colo` drives them over QMP, so
they live in one place. The two sides of a pair must agree on every name that QEMU
sends across (the quorum node is the replication `top-id`, devices must match for the
migration stream).
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

# The agent's private QMP monitor chardev (docs/decisions.md, D5).
QMP_CHARDEV = "ftqmp"
# Its socket in the VM's run dir. A secondary's domain has its own file: after a failover
# the survivor migrates into a new domain in the same run dir (vdsm_ft/identity.py), and
# a QEMU that exits unlinks its listening socket, which must not be the new one's.
# Names short: a unix socket path has at most SOCKET_PATH_MAX bytes, run dir included.
QMP_SOCKET = "qmp.sock"
SOCKET_PATH_MAX = 107              # sun_path holds 108 bytes with its NUL
SECONDARY_QMP_SOCKET = "qmp-sec.sock"
# Secondary domains are named <vm name> + this, with a UUID derived in this namespace
# (docs/engine-view.md). Never change it: a running pair's secondary UUID is recomputed
# from it (here, so that the engine side can too).
SECONDARY_SUFFIX = "-ft-secondary"
FT_NAMESPACE = uuid.UUID("2fda9e63-be79-5fc0-aa87-dff200e760db")
# The unix socket a survivor migrates over into the domain that carries the VM's
# identity (vdsm_ft/identity.py).
IDENTITY_MIGRATION_SOCKET = "mig.sock"
# Every guest disk device sits on a quorum node; the secondary's replication node
# names it as its top-id.
QUORUM_FMT = "ft-quorum{}"
# Primary: the format node of the real image, quorum child 0.
PRIMARY_CHILD_FMT = "ft-disk{}"
# Primary: the NBD client to the secondary's export, added at runtime as quorum child 1.
NBD_NODE_FMT = "ft-nbd{}"
# After a copy-back (vdsm_ft.copyback): the engine's image, opened again on a survivor
# that ran on its replica; the quorum's only child once the pivot is done.
STORAGE_CHILD_FMT = "ft-sd{}"
# Secondary: the replica's format node; exported over NBD under the same name.
SECONDARY_PARENT_FMT = "ft-parent{}"
SECONDARY_HIDDEN_FMT = "ft-hidden{}"
SECONDARY_ACTIVE_FMT = "ft-active{}"
SECONDARY_REPLICATION_FMT = "ft-repl{}"
# With COLO TLS: the x509 creds where a QEMU listens (secondary: migration, NBD;
# primary: mirror, compare) and where it dials (the other ends).
TLS_SERVER_ID = "ft-tls-server"
TLS_CLIENT_ID = "ft-tls-client"


@dataclass(frozen=True)
class Disk:
    """One guest disk as COLO sees it."""

    index: int
    image: str             # primary: the engine's image; secondary: the local replica
    size: int              # virtual size in bytes (active/hidden/NBD must match it)
    fmt: str = "qcow2"     # format of `image` (raw for block devices, usually)
    active: str = ""       # secondary only: active overlay (tmpfs)
    hidden: str = ""       # secondary only: hidden overlay (tmpfs)

    @property
    def quorum(self) -> str:
        return QUORUM_FMT.format(self.index)

    @property
    def primary_child(self) -> str:
        return PRIMARY_CHILD_FMT.format(self.index)

    @property
    def storage_child(self) -> str:
        return STORAGE_CHILD_FMT.format(self.index)

    @property
    def nbd_node(self) -> str:
        return NBD_NODE_FMT.format(self.index)

    @property
    def parent(self) -> str:
        return SECONDARY_PARENT_FMT.format(self.index)

    @property
    def export(self) -> str:
        return SECONDARY_PARENT_FMT.format(self.index)


@dataclass(frozen=True)
class Nic:
    """One guest NIC; `netdev` is the id libvirt gives the tap netdev."""

    index: int
    netdev: str
    mac: str = ""

    # Primary side, created at runtime (docs/decisions.md, D1).
    @property
    def mirror_chardev(self) -> str:       # tcp server: client packets copied to the SVM
        return f"ft-mirror{self.index}"

    @property
    def compare_sec_chardev(self) -> str:  # tcp server: SVM output into colo-compare
        return f"ft-cmpsec{self.index}"

    @property
    def compare_pri_chardevs(self) -> tuple[str, str]:  # unix server/client pair
        return (f"ft-cmppri{self.index}", f"ft-cmppri{self.index}-c")

    @property
    def compare_out_chardevs(self) -> tuple[str, str]:  # unix server/client pair
        return (f"ft-cmpout{self.index}", f"ft-cmpout{self.index}-c")

    @property
    def filter_mirror(self) -> str:
        return f"ft-m{self.index}"

    @property
    def filter_redirect_in(self) -> str:   # compare output back into the NIC's rx
        return f"ft-redire{self.index}-0"

    @property
    def filter_redirect_out(self) -> str:  # PVM rx into colo-compare
        return f"ft-redire{self.index}-1"

    @property
    def iothread(self) -> str:
        return f"ft-iothread{self.index}"

    @property
    def compare(self) -> str:
        return f"ft-comp{self.index}"

    # Secondary side, present from boot in the secondary XML.
    @property
    def red_in_chardev(self) -> str:       # connects to the primary's mirror chardev
        return f"ft-red{self.index}-0"

    @property
    def red_out_chardev(self) -> str:      # connects to the primary's compare_sec chardev
        return f"ft-red{self.index}-1"

    @property
    def filter_sec_in(self) -> str:
        return f"ft-f{self.index}-1"

    @property
    def filter_sec_out(self) -> str:
        return f"ft-f{self.index}-2"

    @property
    def rewriter(self) -> str:
        return f"ft-rew{self.index}"


@dataclass(frozen=True)
class VmLayout:
    """Everything COLO needs to know about one VM on one host."""

    vm_id: str
    name: str
    run_dir: str                  # holds the QMP socket and the local compare sockets
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = field(default_factory=tuple)

    @property
    def qmp_socket(self) -> str:
        return qmp_socket(self.run_dir, self.name)

    def unix_socket(self, chardev: str) -> str:
        return os.path.join(self.run_dir, f"{chardev}.sock")


@dataclass(frozen=True)
class Endpoints:
    """Where the secondary listens and where the primary listens, for one pair.

    Ports come from the agent's port plan; each protected VM has its own set.
    """

    primary_host: str         # replication-network address of the primary
    secondary_host: str       # replication-network address of the secondary
    migration_port: int       # secondary: -incoming / migrate-incoming
    nbd_port: int             # secondary: nbd-server-start
    mirror_ports: tuple[int, ...] = ()   # primary: one per NIC (filter-mirror out)
    compare_ports: tuple[int, ...] = ()  # primary: one per NIC (colo-compare secondary_in)


def qmp_socket(run_dir: str, domain: str) -> str:
    """The private QMP socket of libvirt domain `domain` in its VM's run dir."""
    name = SECONDARY_QMP_SOCKET if domain.endswith(SECONDARY_SUFFIX) else QMP_SOCKET
    return os.path.join(run_dir, name)


def secondary_uuid(vm_uuid: str, generation: int) -> str:
    return str(uuid.uuid5(FT_NAMESPACE, f"{vm_uuid}/secondary/{generation}"))


def longest_socket(run_dir: str) -> str:
    """The longest socket path of a VM under an agent's `run_dir`: a 100th NIC's compare
    socket (Nic), longer than either QMP socket or the identity migration's."""
    vm_dir = os.path.join(run_dir, "vms", str(uuid.UUID(int=0)))   # HostConfig.vm_run_dir
    return VmLayout("", "", vm_dir).unix_socket(Nic(99, "").compare_pri_chardevs[0])


def run_dir_refusal(run_dir: str) -> str | None:
    """Why `run_dir` cannot hold the VMs' sockets, or None. QEMU and the agent could
    not bind or reach them, and the only sign would be a QMP socket that never answers."""
    longest = len(os.fsencode(longest_socket(run_dir)))
    if longest <= SOCKET_PATH_MAX:
        return None
    room = SOCKET_PATH_MAX - (longest - len(os.fsencode(run_dir)))
    return (f"{run_dir} is too long: the VMs' sockets under it would have paths of up to "
            f"{longest} bytes, and a unix socket path holds at most {SOCKET_PATH_MAX}; use "
            f"a directory of at most {room} bytes")
