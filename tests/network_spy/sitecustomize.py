"""Put on the PYTHONPATH of a script run by tests/test_network.py (never imported by pytest itself):
every attempt to reach another host (a DNS look-up or a connection) is written to $NETWORK_SPY_LOG
and fails at once, as it would on a machine without network."""

import os
import socket
import traceback

_LOG = os.environ.get("NETWORK_SPY_LOG")
_LOCAL = {None, "localhost", "127.0.0.1", "::1", "0.0.0.0", ""}


def _refuse(kind, target):
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as fh:
            fh.write(f"{kind} {target!r}\n{''.join(traceback.format_stack(limit=25)[:-2])}\n")
    raise OSError(101, "Network is unreachable (tests/network_spy)")


_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name in _LOCAL or str(name).startswith("127."):
        return _getaddrinfo(host, *args, **kwargs)
    _refuse("dns", name)


_connect = socket.socket.connect


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL \
            and not str(address[0]).startswith("127."):
        _refuse("connect", address)
    return _connect(self, address)


socket.getaddrinfo = getaddrinfo
socket.socket.connect = connect
