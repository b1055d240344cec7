"""vmce's control socket: QMP's wire protocol in front of a running :class:`VmceVm`.

:mod:`.protocol` (framing, messages, errors, argument checks), :mod:`.commands` (what each
command does to the VM), :mod:`.hmp` (``human-monitor-command``), :mod:`.events` (event and
result shapes), :mod:`.server` (the unix-socket server in the VMM process) and :mod:`.client`
(a small synchronous client).
"""

from vmce.kvm.qmp.client import QmpClient, QmpClientError, QmpCommandError
from vmce.kvm.qmp.server import ControlSocketError, QmpServer

__all__ = ["ControlSocketError", "QmpClient", "QmpClientError", "QmpCommandError", "QmpServer"]
