"""The lab's fake oVirt engine: real REST over HTTPS for ovirtsdk4, engine behaviours
modelled from docs/ovirt-facts.md and docs/engine-view.md. Entry point: `FakeEngine`."""
from .engine_state import EngineTiming, HostDriver, ObservedAction, StartRequest, VmReport
from .errors import LabError
from .fake_engine import EngineInfo, FakeEngine
from .model import GiB, Hook

__all__ = ["EngineInfo", "EngineTiming", "FakeEngine", "GiB", "Hook", "HostDriver", "LabError",
           "ObservedAction", "StartRequest", "VmReport"]
