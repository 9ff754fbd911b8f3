"""What keeps web pages from driving the local server: the rules every request passes before
anything else, in one place.

- `Host` must be a name this server answers to: an IP address (a page can only reach an
  address by its own origin, so a literal address cannot be rebound), a localhost name
  (`localhost`, `*.localhost`), the `--host` name, or one given with `--allow-host` (`*`:
  any). Any other name is how DNS rebinding reaches a server on 127.0.0.1: refused, 421.
- A browser's `Origin` must be this server's own or one given with `--allow-origin`:
  a cross-origin request runs nothing, whatever its body (403).
- A request body must be JSON: a `Content-Type` other than `application/json` (or
  `application/...+json`) is refused with a 415, so that the "simple" requests a page may send
  without asking (`text/plain`, forms) never run. Without a `Content-Type` the body is read as
  JSON (command-line clients leave it out; a browser that does sends an `Origin`).

Each refusal is an APIError, answered as OpenAI's JSON error body; the server keeps serving.
"""

import ipaddress
from collections.abc import Iterable
from typing import Optional
from urllib.parse import urlsplit

from .protocol import APIError

JSON_TYPES = ("application/json",)


def host_name(value: str) -> str:
    """The name in a `Host` header or URL authority, without the port, lower case."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8080
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


class RequestGuard:
    def __init__(self, host: str, allow_hosts: Iterable[str] = (), allow_origins: Iterable[str] = ()):
        self.hosts = {host_name(h) for h in (host, *allow_hosts) if h}
        self.origins = {o.strip().rstrip("/").lower() for o in allow_origins}

    def host_allowed(self, header: Optional[str]) -> bool:
        name = host_name(header or "")
        if not name:
            return False
        return (
            "*" in self.hosts
            or name in self.hosts
            or _is_address(name)
            or name == "localhost"
            or name.endswith(".localhost")
        )

    def check(self, method: str, headers) -> None:
        """APIError for a request this server must not run (`headers`: case-insensitive)."""
        host = headers.get("host")
        if not self.host_allowed(host):
            raise APIError(
                421,
                f"this server does not answer to the host name {host_name(host or '')!r}: allow it with --allow-host",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, host):
            raise APIError(
                403,
                f"requests from the web page origin {origin[:200]!r} are not allowed: allow it with --allow-origin",
                code="origin_not_allowed",
            )
        if method == "POST":
            check_json_type(headers.get("content-type"))

    def _origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if "*" in self.origins or origin in self.origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == (host or "").strip().lower()


def check_json_type(content_type: Optional[str]) -> None:
    """A 415 for a body declared as anything but JSON; no declaration is read as JSON."""
    if content_type is None:
        return
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind in JSON_TYPES or (kind.startswith("application/") and kind.endswith("+json")):
        return
    raise APIError(
        415,
        f"the request body must be JSON (Content-Type: application/json), not {kind[:100]!r}",
        code="unsupported_media_type",
    )
