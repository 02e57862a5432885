"""A Toxiproxy-compatible HTTP control API over :class:`ChaosProxy` instances.

Existing Toxiproxy clients (toxiproxy-python, toxiproxy-go, Chaos Toolkit's
``chaostoolkit-toxiproxy`` driver...) can drive resilient-db's proxies through it::

    with ToxiproxyServer("127.0.0.1:8474") as api:   # like `toxiproxy-server`
        ...  # POST http://127.0.0.1:8474/proxies {"name": "pg", "upstream": "db:5432"}

Endpoints, bodies and status codes follow Toxiproxy 2.x:

=======================================  =================================================
``GET /version``                         ``{"version": "..."}``
``POST /reset``                          every proxy enabled, every toxic removed (204)
``GET /proxies``                         ``{name: proxy}``
``POST /proxies``                        create ``{"name", "upstream", "listen", "enabled"}``
                                         (201; 409 if the name exists)
``POST /populate``                       create or replace a list of proxies (201)
``GET /proxies/{p}``                     the proxy, with its toxics
``POST|PATCH /proxies/{p}``              change ``listen``, ``upstream``, ``enabled``
``DELETE /proxies/{p}``                  stop and forget it (204)
``GET /proxies/{p}/toxics``              its toxics
``POST /proxies/{p}/toxics``             add ``{"name", "type", "stream", "toxicity",
                                         "attributes"}`` (409 if the name exists)
``GET /proxies/{p}/toxics/{t}``          the toxic
``POST|PATCH /proxies/{p}/toxics/{t}``   change its ``attributes`` and ``toxicity``
``DELETE /proxies/{p}/toxics/{t}``       remove it (204)
=======================================  =================================================

Errors are ``{"error": message, "status": code}``. As in Toxiproxy, a missing
toxic attribute is zero, ``stream`` defaults to ``downstream`` and ``toxicity`` to
1, and requests from browsers (``User-Agent: Mozilla/...``) are refused, so a web
page cannot drive the proxies.

Attributes use Toxiproxy's names and units: ``latency``/``jitter``, ``delay``
(slow_close) and ``timeout`` in milliseconds, ``rate`` in KB/s (1000 bytes),
slicer ``average_size``/``size_variation`` in bytes and ``delay`` in
microseconds, ``bytes`` for limit_data. Beyond Toxiproxy: latency accepts
``distribution`` (``uniform``/``normal``), and the PostgreSQL toxics are types
``fail_first_n`` (``n``, ``sqlstate``, ``message``, ``match``) and
``drop_commit_ack`` (``count``).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote, urlsplit

from .. import __version__
from ._toxics import TOXIC_TYPES, DuplicateToxicError, Toxic

if TYPE_CHECKING:
    from .proxy import ChaosProxy

__all__ = ["API_VERSION", "ToxiproxyServer", "toxic_from_json", "toxic_to_json"]

API_VERSION: Final = f"2.0.0+resilient-db.{__version__}"
"""What ``GET /version`` answers: Toxiproxy API 2, served by resilient-db."""

# HTTP attribute -> (dataclass field, factor from HTTP units to Python units or None).
_ATTRIBUTES: Final[dict[str, dict[str, tuple[str, float | None]]]] = {
    "latency": {
        "latency": ("latency", 1e-3),
        "jitter": ("jitter", 1e-3),
        "distribution": ("distribution", None),
    },
    "bandwidth": {"rate": ("rate", 1000.0)},
    "slow_close": {"delay": ("delay", 1e-3)},
    "timeout": {"timeout": ("timeout", 1e-3)},
    "reset_peer": {"timeout": ("timeout", 1e-3)},
    "slicer": {
        "average_size": ("average_size", None),
        "size_variation": ("size_variation", None),
        "delay": ("delay", 1e-6),
    },
    "limit_data": {"bytes": ("bytes", None)},
    "fail_first_n": {
        "n": ("n", None),
        "sqlstate": ("sqlstate", None),
        "message": ("message", None),
        "match": ("match", None),
    },
    "drop_commit_ack": {"count": ("count", None)},
}
_GO_ZERO: Final = frozenset({"latency", "jitter", "rate", "delay", "timeout", "bytes"})
"""Toxiproxy attributes that are zero when absent (Go zero values); others keep our defaults."""
_TOXIPROXY_TYPES: Final = frozenset(
    {"latency", "bandwidth", "slow_close", "timeout", "reset_peer", "slicer", "limit_data"}
)


class ApiError(Exception):
    """An error answered to the client as ``{"error": message, "status": status}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(prefix: str, exc: BaseException) -> ApiError:
    return ApiError(400, f"{prefix}: {exc}")


def _to_python(kind: str, http_attributes: dict[str, Any]) -> dict[str, Any]:
    table = _ATTRIBUTES[kind]
    unknown = set(http_attributes) - set(table)
    if unknown:
        raise ApiError(
            400,
            f"bad request body: unknown attribute(s) {sorted(unknown)} for {kind}; "
            f"accepted: {sorted(table)}",
        )
    values: dict[str, Any] = {}
    for key, (field, factor) in table.items():
        if key in http_attributes:
            value = http_attributes[key]
        elif kind in _TOXIPROXY_TYPES and key in _GO_ZERO:
            value = 0
        else:
            continue
        if factor is not None and isinstance(value, int | float) and not isinstance(value, bool):
            value = value * factor
            if factor >= 1:
                value = round(value, 9)
        values[field] = value
    return values


def _http_number(value: float, factor: float) -> float | int:
    result = value / factor
    rounded = round(result)
    return int(rounded) if abs(result - rounded) < 1e-6 else round(result, 6)


def toxic_to_json(toxic: Toxic) -> dict[str, Any]:
    """A toxic as Toxiproxy's JSON (HTTP units)."""
    attributes: dict[str, Any] = {}
    for key, (field, factor) in _ATTRIBUTES[toxic.type].items():
        value = getattr(toxic, field)
        if factor is not None and isinstance(value, int | float):
            value = _http_number(float(value), factor)
        attributes[key] = value
    return {
        "name": toxic.name,
        "type": toxic.type,
        "stream": toxic.stream,
        "toxicity": toxic.toxicity,
        "attributes": attributes,
    }


def toxic_from_json(body: object) -> Toxic:
    """Build a toxic from Toxiproxy's JSON; :class:`ApiError` (400) when it is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "bad request body: a JSON object is expected")
    kind = body.get("type")
    cls = TOXIC_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ApiError(400, f"invalid toxic type: {kind!r}; accepted: {sorted(TOXIC_TYPES)}")
    attributes = body.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise ApiError(400, "bad request body: attributes must be an object")
    kwargs = _to_python(cls.type, attributes)
    for key in ("name", "stream", "toxicity"):
        if body.get(key) not in (None, ""):
            kwargs[key] = body[key]
    if cls.type in _TOXIPROXY_TYPES and "stream" not in kwargs:
        kwargs["stream"] = "downstream"
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise _bad("bad request body", exc) from exc


def _proxy_json(proxy: ChaosProxy) -> dict[str, Any]:
    return {
        "name": proxy.name,
        "listen": proxy.listen,
        "upstream": proxy.upstream,
        "enabled": proxy.running and proxy.enabled,
        "toxics": [toxic_to_json(t) for t in proxy.toxics],
    }


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    api: ToxiproxyServer


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "resilient-db-toxiproxy"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a test suite's output is not the place for an access log."""

    def _dispatch(self, method: str) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length > 0 else b""
            if self.headers.get("User-Agent", "").startswith("Mozilla/"):
                raise ApiError(403, "User agent not allowed")
            try:
                body = json.loads(raw) if raw.strip() else None
            except ValueError as exc:
                raise _bad("bad request body", exc) from exc
            parts = [unquote(p) for p in urlsplit(self.path).path.split("/") if p]
            status, payload = self.server.api.handle(method, parts, body)
        except ApiError as exc:
            status, payload = exc.status, {"error": exc.message, "status": exc.status}
        except Exception as exc:  # the API must answer, whatever broke
            status, payload = 500, {"error": f"{type(exc).__name__}: {exc}", "status": 500}
        data = b"" if payload is None else json.dumps(payload).encode() + b"\n"
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ToxiproxyServer:
    """Serve Toxiproxy's HTTP API for a set of :class:`ChaosProxy` instances.

    Args:
        listen: ``"host:port"`` of the API (port 0: a free one, see :attr:`url`).
            Toxiproxy's usual is ``"127.0.0.1:8474"``.
        seed: the seed of the proxies created through the API.
        proxies: existing proxies to expose (started if they are not); they are
            not stopped when the server stops, unless deleted through the API.

    Proxies created through the API (``POST /proxies``) are the server's own and
    stop with it. Use it as a context manager, sync or async, or call
    :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        *,
        seed: int = 0,
        proxies: Iterable[ChaosProxy] = (),
    ) -> None:
        from .proxy import _parse_address

        self._address = _parse_address("listen", listen, default_host="127.0.0.1")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer; got {type(seed).__name__} {seed!r}")
        self.seed = seed
        self._lock = threading.RLock()
        self._proxies: dict[str, ChaosProxy] = {}
        self._owned: set[str] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        for proxy in proxies:
            self.add_proxy(proxy)

    # -- life cycle --

    @property
    def url(self) -> str:
        """``http://host:port`` of the API (the real port once started)."""
        host, port = self._address
        return f"http://{host}:{port}"

    def start(self) -> ToxiproxyServer:
        """Start serving (in a thread of its own), and start the registered proxies."""
        with self._lock:
            if self._httpd is not None:
                raise RuntimeError("the Toxiproxy API server is already running")
            httpd = _HTTPServer(self._address, _Handler)
            httpd.api = self
            self._address = (self._address[0], httpd.server_address[1])
            self._httpd = httpd
            self._thread = threading.Thread(
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="chaos-toxiproxy-api",
                daemon=True,
            )
            self._thread.start()
            for proxy in self._proxies.values():
                if not proxy.running:
                    proxy.start()
        return self

    def stop(self) -> None:
        """Stop serving, and stop the proxies created through the API."""
        with self._lock:
            httpd, self._httpd = self._httpd, None
            thread, self._thread = self._thread, None
            owned = [self._proxies.pop(name) for name in sorted(self._owned)]
            self._owned.clear()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join()
        for proxy in owned:
            proxy.stop()

    def __enter__(self) -> ToxiproxyServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> ToxiproxyServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    # -- the registry --

    @property
    def proxies(self) -> dict[str, ChaosProxy]:
        """The proxies served, by name (a copy)."""
        with self._lock:
            return dict(self._proxies)

    def add_proxy(self, proxy: ChaosProxy) -> None:
        """Serve an existing proxy (``ValueError`` if its name is taken)."""
        with self._lock:
            if proxy.name in self._proxies:
                raise ValueError(f"a proxy named {proxy.name!r} is already served")
            self._proxies[proxy.name] = proxy
            if self._httpd is not None and not proxy.running:
                proxy.start()

    def create_proxy(
        self, name: str, upstream: str, *, listen: str = "127.0.0.1:0", enabled: bool = True
    ) -> ChaosProxy:
        """Create, start and serve a proxy owned by this server."""
        from .proxy import ChaosProxy

        proxy = ChaosProxy(upstream, listen=listen, name=name, seed=self.seed)
        if not enabled:
            proxy.disable()
        with self._lock:
            if name in self._proxies:
                raise ValueError(f"a proxy named {name!r} is already served")
            proxy.start()
            self._proxies[name] = proxy
            self._owned.add(name)
        return proxy

    def remove_proxy(self, name: str) -> None:
        """Stop a proxy and stop serving it (``KeyError`` if unknown)."""
        with self._lock:
            proxy = self._proxies.pop(name)
            self._owned.discard(name)
        proxy.stop()

    # -- requests --

    def _proxy(self, name: str) -> ChaosProxy:
        with self._lock:
            proxy = self._proxies.get(name)
        if proxy is None:
            raise ApiError(404, "proxy not found")
        return proxy

    def _create_from_json(self, body: object, *, replace: bool) -> ChaosProxy:
        if not isinstance(body, dict):
            raise ApiError(400, "bad request body: a JSON object is expected")
        name, upstream = body.get("name"), body.get("upstream")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "missing required field: name")
        if not isinstance(upstream, str) or not upstream:
            raise ApiError(400, "missing required field: upstream")
        listen = body.get("listen") or "127.0.0.1:0"
        enabled = body.get("enabled", True)
        if not isinstance(listen, str) or not isinstance(enabled, bool):
            raise ApiError(400, "bad request body: listen must be a string, enabled a bool")
        if name in self.proxies:
            if not replace:
                raise ApiError(409, "proxy already exists")
            self.remove_proxy(name)
        try:
            return self.create_proxy(name, upstream, listen=listen, enabled=enabled)
        except (TypeError, ValueError, OSError) as exc:
            raise _bad("bad request body", exc) from exc

    def handle(self, method: str, parts: list[str], body: object) -> tuple[int, Any]:
        """Answer one request: ``(status, JSON payload or None)``."""
        if parts == ["version"] and method == "GET":
            return 200, {"version": API_VERSION}
        if parts == ["reset"] and method == "POST":
            for proxy in self.proxies.values():
                proxy.reset()
            return 204, None
        if parts == ["populate"] and method == "POST":
            if not isinstance(body, list):
                raise ApiError(400, "bad request body: a JSON list of proxies is expected")
            created = [self._create_from_json(item, replace=True) for item in body]
            return 201, {"proxies": [_proxy_json(p) for p in created]}
        if not parts or parts[0] != "proxies":
            raise ApiError(404, "not found")
        if len(parts) == 1:
            if method == "GET":
                return 200, {name: _proxy_json(p) for name, p in self.proxies.items()}
            if method == "POST":
                return 201, _proxy_json(self._create_from_json(body, replace=False))
            raise ApiError(405, "method not allowed")
        proxy = self._proxy(parts[1])
        if len(parts) == 2:
            return self._handle_proxy(method, proxy, body)
        if parts[2] != "toxics" or len(parts) > 4:
            raise ApiError(404, "not found")
        if len(parts) == 3:
            if method == "GET":
                return 200, [toxic_to_json(t) for t in proxy.toxics]
            if method == "POST":
                toxic = toxic_from_json(body)
                try:
                    proxy.add_toxic(toxic)
                except DuplicateToxicError as exc:
                    raise ApiError(409, "toxic already exists") from exc
                except ValueError as exc:
                    raise _bad("bad request body", exc) from exc
                return 200, toxic_to_json(toxic)
            raise ApiError(405, "method not allowed")
        return self._handle_toxic(method, proxy, parts[3], body)

    def _handle_proxy(self, method: str, proxy: ChaosProxy, body: object) -> tuple[int, Any]:
        if method == "GET":
            return 200, _proxy_json(proxy)
        if method == "DELETE":
            self.remove_proxy(proxy.name)
            return 204, None
        if method not in ("POST", "PATCH"):
            raise ApiError(405, "method not allowed")
        if not isinstance(body, dict):
            raise ApiError(400, "bad request body: a JSON object is expected")
        try:
            if body.get("upstream") not in (None, proxy.upstream):
                # As Toxiproxy: a new upstream restarts the proxy (connections closed).
                was_enabled = proxy.enabled
                proxy.disable()
                proxy.set_upstream(body["upstream"])
                if was_enabled:
                    proxy.enable()
            if body.get("listen") not in (None, proxy.listen):
                proxy.set_listen(body["listen"])
            enabled = body.get("enabled")
            if enabled is True and not proxy.enabled:
                proxy.enable()
            elif enabled is False and proxy.enabled:
                proxy.disable()
            elif enabled is not None and not isinstance(enabled, bool):
                raise ApiError(400, "bad request body: enabled must be a bool")
        except (TypeError, ValueError, OSError) as exc:
            raise _bad("bad request body", exc) from exc
        return 200, _proxy_json(proxy)

    def _handle_toxic(
        self, method: str, proxy: ChaosProxy, name: str, body: object
    ) -> tuple[int, Any]:
        try:
            toxic = proxy.get_toxic(name)
        except KeyError:
            raise ApiError(404, "toxic not found") from None
        if method == "GET":
            return 200, toxic_to_json(toxic)
        if method == "DELETE":
            try:
                proxy.remove_toxic(name)
            except KeyError:
                raise ApiError(404, "toxic not found") from None
            return 204, None
        if method not in ("POST", "PATCH"):
            raise ApiError(405, "method not allowed")
        if not isinstance(body, dict):
            raise ApiError(400, "bad request body: a JSON object is expected")
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise ApiError(400, "bad request body: attributes must be an object")
        merged = {**toxic_to_json(toxic)["attributes"], **attributes}
        changes = _to_python(toxic.type, merged)
        if "toxicity" in body:
            changes["toxicity"] = body["toxicity"]
        try:
            updated = proxy.update_toxic(name, **changes)
        except (TypeError, ValueError) as exc:
            raise _bad("bad request body", exc) from exc
        return 200, toxic_to_json(updated)
