"""What `tdb dap` was started with, as opposed to what each launch configuration asks for: the server a
token belongs to, the credential DAP clients of a listener must present, and the folders models may be
loaded from.

    --server HOST:PORT / $TDB_SERVER     the server launches use when they name none
    --token TOKEN / $TDB_TOKEN           that server's bearer token: sent to that address only
    --listen-token TOKEN / $TDB_DAP_TOKEN   with --listen: every DAP client sends it as the launch
                                         attribute "adapterToken" (required when bound beyond loopback)
    --data-dir FOLDER / $TDB_DATA_DIRS   folders a launch's "model" may name (besides the bundled models)

A launch naming another server gets no token unless the launch itself gives one (its "token"
attribute): a configuration copied from elsewhere cannot send the user's token to an address of its
choosing.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass
from typing import Any

LOCAL_NAMES = frozenset({"localhost", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a listener on this machine only ("" and 0.0.0.0 do not)."""
    host = host.strip().strip("[]").lower()
    if host in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def same_server(a: str, b: str) -> bool:
    """Whether two "host:port" addresses are written the same (case and spaces aside): a token goes only
    to the address it was configured with, so no name resolution is tried."""
    return bool(a) and a.strip().lower() == b.strip().lower()


@dataclass(frozen=True)
class AdapterOptions:
    server: str = ""                     # the configured server; launches without "server" use it
    token: str = ""                      # the configured server's token: sent to that address only
    listen_token: str = ""               # the credential DAP clients of --listen must present
    data_dirs: tuple[str, ...] = ()      # folders a launch's "model" may name, besides the bundled models

    @classmethod
    def from_args(cls, server: str | None = None, token: str | None = None, listen_token: str | None = None,
                  data_dirs: Any = ()) -> "AdapterOptions":
        """Flags first, the environment for those not given."""
        env = os.environ
        dirs = [*data_dirs, *[d for d in env.get("TDB_DATA_DIRS", "").split(os.pathsep) if d]]
        return cls(server=(server or env.get("TDB_SERVER") or "").strip(),
                   token=token or env.get("TDB_TOKEN") or "",
                   listen_token=listen_token or env.get("TDB_DAP_TOKEN") or "",
                   data_dirs=tuple(dict.fromkeys(dirs)))

    def token_for(self, address: str, launch_token: Any = None) -> str:
        """The token to send to `address`: the launch's own, else the configured one if `address` is the
        configured server, else none ("")."""
        if isinstance(launch_token, str) and launch_token:
            return launch_token
        return self.token if same_server(address, self.server) else ""

    def admits(self, presented: Any) -> bool:
        """Whether a DAP client's "adapterToken" matches --listen-token (always, when none is set)."""
        if not self.listen_token:
            return True
        return isinstance(presented, str) and hmac.compare_digest(presented.encode(), self.listen_token.encode())
