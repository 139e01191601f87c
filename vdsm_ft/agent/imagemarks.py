"""The storage-domain image's stale mark in etcd, dropped once a copy-back made it current.

Each verified copy-back is noted in the state dir (store.ImageNotes) until etcd took it,
also across a stop (which forgets the VM) and an agent restart, so that an etcd outage
at that moment cannot leave a current image refused for good.
"""
from __future__ import annotations

import logging
import threading

from vdsm_ft.agent.store import ImageNote, ImageNotes, StoreError
from vdsm_ft.arbiter import Arbiter, ArbiterError, StaleImage

log = logging.getLogger("vdsm_ft.agent")

# How often to tell etcd again that a copy-back made an image current.
IMAGE_MARK_RETRY_S = 30.0


class ImageMarks:
    def __init__(self, host_id: str, arbiter: Arbiter, arbiter_bound: float,
                 notes: ImageNotes):
        self.host_id = host_id
        self.arbiter = arbiter
        self.arbiter_bound = arbiter_bound
        self.notes = notes
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="image-marks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def made_current(self, vm_id: str, name: str, generation: int) -> None:
        """A verified copy-back: etcd may drop the image's stale mark."""
        if not generation:
            return
        note = ImageNote(vm_id, name, generation)
        self.notes.save(note)
        self._tell(note)

    def noted_current(self, mark: StaleImage | None) -> bool:
        """This host verified a copy-back of the mark's generation or a later one."""
        if mark is None or mark.host != self.host_id:
            return False
        try:
            note = self.notes.get(mark.vm_id)
        except StoreError:
            return False
        return note is not None and note.generation >= mark.generation

    def _tell(self, note: ImageNote) -> None:
        try:
            self.arbiter.image_current(note.vm_id, note.generation, self.host_id,
                                       timeout=self.arbiter_bound)
        except ArbiterError as exc:
            log.warning("%s: the arbiter still marks the storage-domain image stale "
                        "(retried in %.0f s): %s", note.name, IMAGE_MARK_RETRY_S, exc)
            return
        self.notes.delete(note.vm_id)

    def _loop(self) -> None:
        # Its own thread: an etcd call may take the arbiter's whole bound, which neither
        # the monitor's heartbeats nor a VM's steps can wait for.
        while True:
            try:
                for note in self.notes.load_all():
                    self._tell(note)
            except StoreError:
                log.exception("image notes unreadable")
            if self._stopped.wait(IMAGE_MARK_RETRY_S):
                return
