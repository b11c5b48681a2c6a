"""`RequestGuard`, the ASGI middleware every request passes before a route: it refuses what a web
browser could be made to send, and gives every answer an `X-Request-Id`.

- An `Origin` header (browsers send one on cross-origin requests; API clients such as curl, `kbi
  adapt` or TF Serving clients send none) must name the server itself (`Host`): any other origin,
  including `null`, gets 403. A page the user visits cannot write sessions or call `:adapt`, even with
  a body (text/plain, form data) that needs no CORS preflight.
- Without a token, the `Host` header must be a loopback name (`localhost`, `127.x.x.x`, `[::1]`,
  port optional), and no proxy header (`Forwarded`, `X-Forwarded-For`, `X-Forwarded-Host`,
  `X-Real-IP`) may be present: 403 otherwise. A DNS-rebinding page (whose name resolves to 127.0.0.1)
  sends its own name as `Host`, and a proxy in front makes the server public while it still binds
  loopback: both need `--token-file`. With a token, any `Host` is served (a public name behind a proxy).
"""

import ipaddress
import json
import uuid
from urllib.parse import urlsplit

PROXY_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-real-ip")
DEFAULT_PORTS = {"http": 80, "https": 443}


def host_and_port(netloc, default_port=None):
    """("host", port or `default_port`) of `netloc` ("127.0.0.1:8501", "[::1]", "LocalHost"); None if malformed."""
    try:
        parts = urlsplit("//" + netloc)
        return (parts.hostname or "").rstrip("."), parts.port or default_port
    except ValueError:  # a port that is not a number, an unclosed "["
        return None


def loopback_name(host):
    """Whether `host` (a Host header's name, without port) names this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def same_origin(origin, host):
    """Whether the `Origin` header `origin` ("http://127.0.0.1:8501") names the server reached as `host`
    (the Host header): same name and port, http or https (a TLS proxy may sit in between)."""
    parts = urlsplit(origin)
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc or parts.path or parts.query:
        return False
    theirs = host_and_port(parts.netloc, DEFAULT_PORTS[parts.scheme])
    ours = host_and_port(host, theirs[1] if theirs else None)  # a Host without port: the origin's default
    return theirs is not None and theirs == ours


def refusal(headers, token_configured):
    """Why a request with `headers` ({lower-case name: value}) is refused, or None."""
    host, origin = headers.get("host"), headers.get("origin")
    if origin is not None and (host is None or not same_origin(origin, host)):
        return (f"cross-origin request refused: Origin {origin[:100]!r} is not this server. The server answers "
                "API clients, not web pages; send the request without an Origin header.")
    if token_configured:
        return None
    if host is not None and (host_and_port(host) is None or not loopback_name(host_and_port(host)[0])):
        return (f"Host {host[:100]!r} is not a loopback name, and this server has no token: start it with "
                "`kbi serve --token-file FILE` to serve it under another name or behind a proxy.")
    proxied = [name.decode() for name in PROXY_HEADERS if name.decode() in headers]
    if proxied:
        return (f"a proxy header ({proxied[0]}) came with the request, and this server has no token: a proxy "
                "makes it reachable beyond this machine; start it with `kbi serve --token-file FILE`.")
    return None


class RequestGuard:
    """ASGI middleware: gives each HTTP request an id (`scope["state"]["request_id"]`, the routes log
    and answer with it), sends it as `X-Request-Id` on every answer (404s and 405s included), and
    answers 403 to what `refusal` refuses before any route runs. `token_configured`: the server has a
    bearer token (`kbi serve --token-file`)."""

    def __init__(self, app, token_configured=False):
        self.app = app
        self.token_configured = token_configured

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        reason = refusal(headers, self.token_configured)
        if reason is None:
            return await self.app(scope, receive, send_with_id)
        body = json.dumps({"error": reason}).encode()
        await send_with_id({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send_with_id({"type": "http.response.body", "body": body})
