"""vdsm-ft: fault tolerance for oVirt virtual machines with QEMU COLO."""
from setuptools import find_packages, setup

setup(
    name="vdsm-ft",
    version="0.1.0",
    description="Fault tolerance for oVirt VMs: QEMU COLO pairs driven by VDSM hooks, "
                "a per-host agent and an engine-side poller",
    license="GPL-2.0-or-later",
    python_requires=">=3.9",
    packages=find_packages(include=["vdsm_ft", "vdsm_ft.*", "engine_plugin",
                                    "engine_plugin.*", "ftlab", "ftlab.*"]),
    include_package_data=True,
    install_requires=[],
    extras_require={
        # Hosts: libvirt-python and lxml come from the distribution (python3-libvirt,
        # python3-lxml), as VDSM hooks run on the system Python (docs/decisions.md, D6).
        "host": ["qemu.qmp>=0.0.3", "etcd3gw>=2.1"],
        "engine": ["ovirt-engine-sdk-python>=4.6.3,<4.7", "etcd3gw>=2.1"],
        # ansible: the oVirt collection (ovirt.ovirt 3.2) is bundled in 9.x to 12.x
        # (checked 9.13, 10.7, 11.0, 12.0, 12.3); its ovirt_vm modules need only the SDK.
        "test": ["pytest>=7", "qemu.qmp>=0.0.3", "etcd3gw>=2.1",
                 "ovirt-engine-sdk-python>=4.6.3,<4.7", "ansible>=9,<13"],
    },
    entry_points={
        "console_scripts": [
            "vdsm-ft=ftlab.cli:main",
            "vdsm-ft-agent=vdsm_ft.agent.main:main",
            "ovirt-ft=engine_plugin.cli:main",
            "ovirt-ft-poller=engine_plugin.poller:main",
        ],
    },
)
