"""The one exception tree of ztnet.

Every exception that may reach a user derives from :class:`ZtnetError`; the
CLI prints ``str(exc)`` and exits with ``exc.exit_code``. Messages start with
the subsystem that failed (``"datapath: attach to /sys/fs/cgroup/x failed:
EPERM"``) so a one-line log names where to look.

    ZtnetError
    ├── ConfigError                 bad input from a file or the command line
    │   └── PolicyError             a policy file that does not validate
    ├── GrantError                  a grant or bundle that must not be applied
    │   ├── SignatureInvalid
    │   ├── UnknownKey
    │   ├── BundleRejected          wrong host, rollback, freeze, malformed …
    │   └── GrantExpired
    ├── IdentityError               cgroups, agents, launching processes
    │   └── TpmError                the host's TPM (open, keys, attestation, signatures)
    ├── DatapathError               anything between us and the kernel
    │   ├── UnsupportedKernel
    │   ├── LoadError               carries the verifier log
    │   ├── AttachError             carries the cgroup
    │   ├── MapUpdateError          carries the map and key
    │   └── NotAttached             enforcement is not in place
    ├── ControllerError             talking to the controller
    │   └── RpcFailure              becomes the gRPC status a caller sees (carries the code)
    └── LabError                    the lab could not build or drive a test topology
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only the type: the error tree imports nothing at run time
    import grpc


class ZtnetError(Exception):
    """Root of every error ztnet reports to a user."""

    exit_code = 1


class ConfigError(ZtnetError):
    exit_code = 2


class PolicyError(ConfigError):
    pass


class GrantError(ZtnetError):
    exit_code = 3


class SignatureInvalid(GrantError):
    pass


class UnknownKey(GrantError):
    pass


class BundleRejected(GrantError):
    pass


class GrantExpired(GrantError):
    pass


class IdentityError(ZtnetError):
    exit_code = 4


class TpmError(IdentityError):
    """The TPM could not be opened or refused a command (messages start with ``tpm:``)."""


class DatapathError(ZtnetError):
    exit_code = 5


class UnsupportedKernel(DatapathError):
    pass


class LoadError(DatapathError):
    def __init__(self, message: str, verifier_log: str = "") -> None:
        super().__init__(message)
        self.verifier_log = verifier_log


class AttachError(DatapathError):
    def __init__(self, message: str, cgroup: str) -> None:
        super().__init__(message)
        self.cgroup = cgroup


class MapUpdateError(DatapathError):
    def __init__(self, message: str, map_name: str, key: object = None) -> None:
        super().__init__(message)
        self.map_name = map_name
        self.key = key


class NotAttached(DatapathError):
    pass


class ControllerError(ZtnetError):
    exit_code = 6


class RpcFailure(ControllerError):
    """Raised by the controller's logic; ``ztnet.controller.rpc`` turns it into the gRPC
    status ``code`` with this message (``ztnet.controller.status`` builds the common ones)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class LabError(ZtnetError):
    """The lab could not build or drive a test topology (messages start with ``lab:``)."""
