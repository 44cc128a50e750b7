"""Interrupt plumbing of one simulated device: VFIO_DEVICE_SET_IRQS and delivery.

Interrupts are delivered by writing the eventfds the driver registered
(`os.eventfd_write`), so a driver's task wakes through the event loop's real
readiness path. Like the kernel, the machine keeps its own reference to each
registered eventfd (a `dup`), so a driver closing its fd early neither breaks
delivery nor lets a reused fd number receive interrupts.

INTx follows vfio-pci on a PCI 2.3 device: level-triggered and auto-masked.
When the line is asserted and the interrupt is unmasked, vfio-pci masks it
and signals the eventfd once; ACTION_UNMASK unmasks it, and if the line is
still asserted the interrupt fires again at once (vfio_pci_intx_unmask).
MSI and MSI-X deliver per vector, only while the index is enabled, the
vector has an eventfd, and Bus Master is set in COMMAND (an MSI is a memory
write; QEMU and real hardware drop it otherwise).
"""

from __future__ import annotations

import enum
import os
import struct
import threading
from collections.abc import Callable

from attrs import define, field

from .._uapi.vfio import IrqSetFlag, PciIrq
from . import rules
from .config_space import ConfigSpace
from .rules import Personality

__all__ = ["DeviceIrqs", "IrqType", "Trigger", "get_eventfd", "validate_irq_set"]

_DATA_SIZES = {IrqSetFlag.DATA_NONE: 0, IrqSetFlag.DATA_BOOL: 1, IrqSetFlag.DATA_EVENTFD: 4}


class IrqType(enum.IntEnum):
    """The interrupt type a device has enabled (vdev->irq_type)."""

    INTX = PciIrq.INTX
    MSI = PciIrq.MSI
    MSIX = PciIrq.MSIX
    NONE = PciIrq.NUM_IRQS


def get_eventfd(fd: int) -> Trigger:
    """Take a reference to the eventfd `fd` (eventfd_ctx_fdget), or refuse."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise rules.SET_IRQS_BAD_EVENTFD.error(f"fd {fd}") from exc
    if target != "anon_inode:[eventfd]":
        raise rules.SET_IRQS_NOT_EVENTFD.error(f"fd {fd} is {target}")
    try:
        dup = os.dup(fd)
    except OSError as exc:
        raise rules.SET_IRQS_BAD_EVENTFD.error(f"fd {fd}") from exc
    return Trigger(user_fd=fd, fd=dup)


#: Serialises signalling and releasing triggers: the machine signals the interrupts a
#: clock callback sent after it has let go of the machine lock, so a release (under that
#: lock) must not close, and let the process reuse, an fd being written.
_TRIGGERS = threading.Lock()


@define(eq=False)
class Trigger:
    """A registered eventfd: the driver's fd number and the machine's own reference."""

    user_fd: int
    fd: int = field(repr=False)

    def signal(self) -> None:
        with _TRIGGERS:
            if self.fd < 0:
                return  # released since it was sent
            # not contextlib.suppress: two Python-level calls on every interrupt
            try:  # noqa: SIM105
                os.eventfd_write(self.fd, 1)
            except BlockingIOError:  # the counter is saturated
                pass

    def release(self) -> None:
        with _TRIGGERS:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


@define(eq=False)
class DeviceIrqs:
    """vdev->irq_type, ctx[], err_trigger and req_trigger of one device."""

    config: ConfigSpace
    #: called with a message when the device sends an interrupt nobody receives
    on_drop: Callable[..., None]
    #: the kernel version's behaviour (dynamic MSI-X, loopback of unallocated vectors)
    personality: Personality = field(factory=lambda: Personality.of(rules.NEWEST_KERNEL))
    irq_type: IrqType = IrqType.NONE
    #: INTx: ctx[0]; MSI/MSI-X: one slot per allocated vector
    vectors: list[Trigger | None] = field(factory=list)
    intx_masked: bool = False
    intx_level: bool = False
    err_trigger: Trigger | None = None
    req_trigger: Trigger | None = None

    # --- counts (vfio_pci_get_irq_count) ------------------------------------------------

    def count(self, index: int) -> int:
        if index == PciIrq.INTX:
            return 1 if self.config.interrupt_pin else 0
        if index == PciIrq.MSI:
            return self.config.msi_vectors
        if index == PciIrq.MSIX:
            return self.config.msix_vectors
        if index == PciIrq.ERR:
            return 1 if self.config.is_pcie else 0
        if index == PciIrq.REQ:
            return 1
        return 0

    # --- VFIO_DEVICE_SET_IRQS --------------------------------------------------------------

    def set_irqs(self, flags: int, index: int, start: int, count: int, data: bytes) -> None:
        """Apply a validated vfio_irq_set; `data` holds exactly the count items."""
        action = flags & IrqSetFlag.ACTION_TYPE_MASK
        if index == PciIrq.INTX:
            if action == IrqSetFlag.ACTION_MASK:
                return self._intx_mask(flags, start, count, data)
            if action == IrqSetFlag.ACTION_UNMASK:
                return self._intx_unmask(flags, start, count, data)
            if action == IrqSetFlag.ACTION_TRIGGER:
                return self._intx_trigger(flags, start, count, data)
        elif index in (PciIrq.MSI, PciIrq.MSIX):
            if action == IrqSetFlag.ACTION_TRIGGER:
                return self._msi_trigger(IrqType(index), flags, start, count, data)
        elif index in (PciIrq.ERR, PciIrq.REQ) and action == IrqSetFlag.ACTION_TRIGGER:
            return self._single_trigger(index, flags, start, count, data)
        raise rules.SET_IRQS_ACTION.error(f"index {index}, flags {flags:#x}")

    @staticmethod
    def _fds(data: bytes, count: int) -> list[int]:
        return list(struct.unpack_from(f"<{count}i", data))

    # INTx ---------------------------------------------------------------------------------

    def _intx_mask(self, flags: int, start: int, count: int, data: bytes) -> None:
        if self.irq_type != IrqType.INTX:
            raise rules.SET_IRQS_NOT_ENABLED.error("INTx mask: INTx is not enabled")
        if start != 0 or count != 1:
            raise rules.SET_IRQS_INTX_RANGE.error(f"INTx mask with start {start}, count {count}")
        if flags & IrqSetFlag.DATA_EVENTFD:
            raise rules.SET_IRQS_MASK_EVENTFD.error()
        if flags & IrqSetFlag.DATA_NONE or data[0]:
            self.intx_masked = True

    def _intx_unmask(self, flags: int, start: int, count: int, data: bytes) -> None:
        if self.irq_type != IrqType.INTX:
            raise rules.SET_IRQS_NOT_ENABLED.error("INTx unmask: INTx is not enabled")
        if start != 0 or count != 1:
            raise rules.SET_IRQS_INTX_RANGE.error(f"INTx unmask with start {start}, count {count}")
        if flags & IrqSetFlag.DATA_EVENTFD:
            raise rules.NOT_SIMULATED.error("INTx unmask through an eventfd (virqfd)")
        if flags & IrqSetFlag.DATA_NONE or data[0]:
            self.intx_unmask()

    def intx_unmask(self) -> None:
        """vfio_pci_intx_unmask: unmask, or fire again if the line is still asserted."""
        if self.irq_type != IrqType.INTX or not self.intx_masked:
            return
        if self.intx_level and self._intx_trigger_fd() is not None:
            self._send_intx()  # stays masked: vfio re-sends instead of unmasking
        else:
            self.intx_masked = False

    def intx_mask(self) -> None:
        if self.irq_type == IrqType.INTX:
            self.intx_masked = True

    def _intx_trigger(self, flags: int, start: int, count: int, data: bytes) -> None:
        if self.irq_type == IrqType.INTX and count == 0 and flags & IrqSetFlag.DATA_NONE:
            self._intx_disable()
            return
        if self.irq_type not in (IrqType.INTX, IrqType.NONE):
            raise rules.SET_IRQS_OTHER_TYPE_ENABLED.error(
                f"INTx trigger while {self.irq_type.name} is enabled"
            )
        if start != 0 or count != 1:
            raise rules.SET_IRQS_INTX_RANGE.error(f"INTx trigger with start {start}, count {count}")
        if flags & IrqSetFlag.DATA_EVENTFD:
            fd = self._fds(data, 1)[0]
            trigger = get_eventfd(fd) if fd >= 0 else None
            if self.irq_type == IrqType.NONE:
                self.irq_type = IrqType.INTX
                self.vectors = [None]
                self.intx_masked = False
            self._replace(0, trigger)
            self._intx_evaluate()
            return
        if self.irq_type != IrqType.INTX:
            raise rules.SET_IRQS_NOT_ENABLED.error("INTx loopback: INTx is not enabled")
        if flags & IrqSetFlag.DATA_NONE or data[0]:
            self._send_intx()

    def _intx_disable(self) -> None:
        self._replace(0, None)
        self.vectors = []
        self.irq_type = IrqType.NONE
        self.intx_masked = False

    def _intx_trigger_fd(self) -> Trigger | None:
        return self.vectors[0] if self.irq_type == IrqType.INTX and self.vectors else None

    def _send_intx(self) -> None:
        trigger = self._intx_trigger_fd()
        if trigger is not None:
            trigger.signal()

    def set_intx_level(self, asserted: bool) -> None:
        """The device drives its INTx line."""
        if not self.config.interrupt_pin:
            if asserted:
                self.on_drop("INTx asserted by a device without an interrupt pin")
            return
        self.intx_level = asserted
        self.config.set_intx_status(asserted)
        self._intx_evaluate()

    def _intx_evaluate(self) -> None:
        """vfio_intx_handler: an asserted, unmasked line masks itself and signals once."""
        if self.irq_type != IrqType.INTX or self.intx_masked or not self.intx_level:
            return
        if self._intx_trigger_fd() is None:
            return  # no handler is registered without an eventfd
        self.intx_masked = True
        self._send_intx()

    # MSI / MSI-X --------------------------------------------------------------------------

    def _msi_trigger(self, kind: IrqType, flags: int, start: int, count: int, data: bytes) -> None:
        if self.irq_type == kind and count == 0 and flags & IrqSetFlag.DATA_NONE:
            self._msi_disable()
            return
        if self.irq_type not in (kind, IrqType.NONE):
            raise rules.SET_IRQS_OTHER_TYPE_ENABLED.error(
                f"{kind.name} trigger while {self.irq_type.name} is enabled"
            )
        if flags & IrqSetFlag.DATA_EVENTFD:
            fds = self._fds(data, count)
            if self.irq_type == kind:
                self._set_block(kind, start, fds)
                return
            # vfio_msi_enable then vfio_msi_set_block; on failure vfio_msi_disable, so
            # taking every reference first is the same: a bad fd leaves it disabled.
            triggers: list[Trigger | None] = []
            try:
                for fd in fds:  # a loop: a bad fd must release the earlier ones
                    triggers.append(get_eventfd(fd) if fd >= 0 else None)  # noqa: PERF401
            except BaseException:
                for t in triggers:
                    if t is not None:
                        t.release()
                raise
            self.irq_type = kind
            self.vectors = [None] * (start + count)
            if kind == IrqType.MSI:
                self.config.set_msi_enable(True)
            else:
                self.config.set_msix_enable(True)
            for i, trigger in enumerate(triggers):
                self._replace(start + i, trigger)
            return
        if self.irq_type != kind:
            raise rules.SET_IRQS_NOT_ENABLED.error(f"{kind.name} loopback: not enabled")
        # 6.12: vfio_irq_ctx_get finds no context for unallocated vectors: skipped
        if start + count > len(self.vectors) and self.personality.msix_loopback_unallocated != 0:
            self._check_allocated(kind, start, count)
        for i in range(count):
            vector = start + i
            trigger = self.vectors[vector] if vector < len(self.vectors) else None
            if trigger is not None and (flags & IrqSetFlag.DATA_NONE or data[i]):
                trigger.signal()

    def _set_block(self, kind: IrqType, start: int, fds: list[int]) -> None:
        """vfio_msi_set_block on an enabled index: vector by vector.

        Each vector's old eventfd goes first, then the new one is taken; when
        one is bad, every vector from `start` up to the failing one is left
        unhooked (the error path sets them to -1) and the rest keep theirs.
        With dynamic MSI-X (6.5+) vectors past those allocated are added.
        """
        count = len(fds)
        if start + count > len(self.vectors):
            if kind == IrqType.MSIX and self.personality.msix_dynamic:
                self.vectors.extend([None] * (start + count - len(self.vectors)))
            else:
                self._check_allocated(kind, start, count)
        for i, fd in enumerate(fds):
            vector = start + i
            self._replace(vector, None)
            if fd < 0:
                continue
            try:
                self.vectors[vector] = get_eventfd(fd)
            except BaseException:
                for j in range(start, vector + 1):
                    self._replace(j, None)
                raise

    def _check_allocated(self, kind: IrqType, start: int, count: int) -> None:
        if start + count > len(self.vectors):
            raise rules.SET_IRQS_VECTOR_NOT_ALLOCATED.error(
                f"{kind.name} vectors {start}..{start + count - 1}; "
                f"{len(self.vectors)} were allocated when it was enabled"
            )

    def _msi_disable(self) -> None:
        for i in range(len(self.vectors)):
            self._replace(i, None)
        if self.irq_type == IrqType.MSI:
            self.config.set_msi_enable(False)
        else:
            self.config.set_msix_enable(False)
        self.vectors = []
        self.irq_type = IrqType.NONE

    def send_msi(self, kind: IrqType, vector: int, later: list[Trigger] | None = None) -> None:
        """The device sends MSI or MSI-X vector `vector`.

        With `later`, the eventfd to signal is appended to it instead: the
        machine signals those at the end of the clock callback that sent them.
        """
        if self.irq_type != kind:
            self.on_drop(f"{kind.name} vector {vector} sent while {kind.name} is not enabled")
            return
        if not 0 <= vector < len(self.vectors) or self.vectors[vector] is None:
            self.on_drop(f"{kind.name} vector {vector} sent but it has no eventfd")
            return
        if not self.config.bus_master:
            self.on_drop(
                f"{kind.name} vector {vector} dropped: Bus Master is off in COMMAND (an MSI is "
                "a memory write; set Bus Master: dev.config.enable())",
                "bus_master",
            )
            return
        trigger = self.vectors[vector]
        assert trigger is not None
        if later is None:
            trigger.signal()
        else:
            later.append(trigger)

    # ERR / REQ ----------------------------------------------------------------------------

    def _single_trigger(self, index: int, flags: int, start: int, count: int, data: bytes) -> None:
        if start != 0 or count > 1:
            raise rules.SET_IRQS_INTX_RANGE.error(f"index {index}: start {start}, count {count}")
        current = self.err_trigger if index == PciIrq.ERR else self.req_trigger
        if flags & IrqSetFlag.DATA_NONE:
            if current is None:
                raise rules.SET_IRQS_NOT_ENABLED.error(f"index {index}: DATA_NONE with no eventfd")
            if count:
                current.signal()
            else:
                self._set_single(index, None)
            return
        if not count:
            raise rules.SET_IRQS_INTX_RANGE.error(f"index {index}: count 0 with data")
        if flags & IrqSetFlag.DATA_BOOL:
            if data[0] and current is not None:
                current.signal()
            return
        fd = self._fds(data, 1)[0]
        if fd == -1:
            self._set_single(index, None)
        elif fd >= 0:
            self._set_single(index, get_eventfd(fd))

    def _set_single(self, index: int, trigger: Trigger | None) -> None:
        old = self.err_trigger if index == PciIrq.ERR else self.req_trigger
        if old is not None:
            old.release()
        if index == PciIrq.ERR:
            self.err_trigger = trigger
        else:
            self.req_trigger = trigger

    def signal_req(self) -> bool:
        """Ask the driver to release the device; False when nobody listens."""
        if self.req_trigger is None:
            return False
        self.req_trigger.signal()
        return True

    def signal_err(self) -> bool:
        if self.err_trigger is None:
            return False
        self.err_trigger.signal()
        return True

    # --- shared --------------------------------------------------------------------------

    def _replace(self, vector: int, trigger: Trigger | None) -> None:
        old = self.vectors[vector]
        if old is not None:
            old.release()
        self.vectors[vector] = trigger

    def disable(self) -> None:
        """What vfio_pci_core_disable does: the enabled type off (DATA_NONE, count 0)."""
        if self.irq_type == IrqType.INTX:
            self._intx_disable()
        elif self.irq_type in (IrqType.MSI, IrqType.MSIX):
            self._msi_disable()

    def close(self) -> None:
        """The last close: interrupts off, ERR and REQ released."""
        self.disable()
        self._set_single(PciIrq.ERR, None)
        self._set_single(PciIrq.REQ, None)

    def describe(self) -> list[str]:
        """What is enabled, for `Machine.leaks()`."""
        out: list[str] = []
        if self.irq_type == IrqType.INTX:
            t = self.vectors[0] if self.vectors else None
            fd = f"eventfd {t.user_fd}" if t is not None else "no eventfd"
            out.append(f"INTx enabled ({fd})")
        elif self.irq_type in (IrqType.MSI, IrqType.MSIX):
            for i, t in enumerate(self.vectors):
                fd = f"eventfd {t.user_fd}" if t is not None else "no eventfd"
                out.append(f"{self.irq_type.name} vector {i} enabled ({fd})")
        if self.err_trigger is not None:
            out.append(f"ERR eventfd {self.err_trigger.user_fd} registered")
        if self.req_trigger is not None:
            out.append(f"REQ eventfd {self.req_trigger.user_fd} registered")
        return out


def validate_irq_set(
    flags: int, index: int, start: int, count: int, argsz: int, minsz: int, max_irqs: int
) -> int:
    """vfio_set_irqs_validate_and_prepare: return the size of the data that follows."""
    if (
        argsz < minsz
        or index >= PciIrq.NUM_IRQS
        or count >= 0xFFFFFFFF - start
        or flags & ~int(IrqSetFlag.DATA_TYPE_MASK | IrqSetFlag.ACTION_TYPE_MASK)
    ):
        raise rules.SET_IRQS_HEADER.error(
            f"argsz {argsz} (needs {minsz}), index {index}, start {start}, count {count}, "
            f"flags {flags:#x}"
        )
    if start >= max_irqs or start + count > max_irqs:
        raise rules.SET_IRQS_RANGE.error(
            f"index {index} has {max_irqs} vector(s); start {start}, count {count}"
        )
    data_type = flags & IrqSetFlag.DATA_TYPE_MASK
    if data_type not in _DATA_SIZES:
        raise rules.SET_IRQS_DATA_TYPE.error(f"flags {flags:#x}")
    size = _DATA_SIZES[IrqSetFlag(data_type)] * count
    if size and argsz - minsz < size:
        raise rules.SET_IRQS_DATA_SIZE.error(f"argsz {argsz} holds no {count} items of data")
    return size
