"""A webhook receiver for the e2e tests.

A threaded http.server on a loopback port that records every POST and verifies
fal's webhook signature independently of the sidecar's code, with the
`cryptography` package's Ed25519:

    message   = f"{request_id}\\n{user_id}\\n{timestamp}\\n{sha256_hex(raw body)}"
    signature = bytes.fromhex(X-Fal-Webhook-Signature)  (64 bytes, lowercase hex)
    keys      = JWKS at /.well-known/jwks.json (OKP / Ed25519, base64url "x"); try every key
    timestamp must be within 300 s of our clock

It can be stopped and started again on the same port (receiver down, then up).
Per-path canned responses (`respond(path, 500, 500)`) let a test make the first
deliveries fail; the default answer is 200.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from helpers import free_port, wait_until

TIMESTAMP_WINDOW = 300


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def load_jwks_keys(doc: dict) -> list[Ed25519PublicKey]:
    keys = []
    for jwk in doc.get("keys", []):
        if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519" and "x" in jwk:
            raw = b64url_decode(jwk["x"])
            if len(raw) == 32:
                keys.append(Ed25519PublicKey.from_public_bytes(raw))
    return keys


def verify_signature(headers: dict[str, str], body: bytes, keys: list[Ed25519PublicKey],
                     now: float | None = None) -> str | None:
    """Return None when valid, else the reason it is not."""
    rid = headers.get("x-fal-webhook-request-id")
    uid = headers.get("x-fal-webhook-user-id")
    ts = headers.get("x-fal-webhook-timestamp")
    sig_hex = headers.get("x-fal-webhook-signature")
    if not rid or uid is None or not ts or not sig_hex:
        return f"missing signature headers: {sorted(k for k in headers if k.startswith('x-fal-webhook'))}"
    try:
        ts_int = int(ts)
    except ValueError:
        return f"timestamp is not an integer: {ts!r}"
    now = time.time() if now is None else now
    if abs(now - ts_int) > TIMESTAMP_WINDOW:
        return f"timestamp {ts_int} outside the {TIMESTAMP_WINDOW}s window (now {now:.0f})"
    if sig_hex != sig_hex.lower():
        return "signature is not lowercase hex"
    try:
        sig = bytes.fromhex(sig_hex)
    except ValueError:
        return "signature is not hex"
    if len(sig) != 64:
        return f"signature is {len(sig)} bytes, expected 64"
    message = f"{rid}\n{uid}\n{ts}\n{hashlib.sha256(body).hexdigest()}".encode()
    if not keys:
        return "no Ed25519 keys in the JWKS"
    for key in keys:
        try:
            key.verify(sig, message)
            return None
        except InvalidSignature:
            continue
    return "signature does not verify with any JWKS key"


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    verify_error: str | None
    answered: int
    json: Any = field(default=None)

    @property
    def verified(self) -> bool:
        return self.verify_error is None


class WebhookReceiver:
    def __init__(self, jwks_url: str | Callable[[], str], port: int | None = None, host: str = "127.0.0.1"):
        self._jwks_url = jwks_url
        self.host = host
        self.port = port or free_port(host)
        self.deliveries: list[Delivery] = []  # answered 2xx or not, in arrival order
        self._responses: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._keys: list[Ed25519PublicKey] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- keys --------------------------------------------------------------
    @property
    def jwks_url(self) -> str:
        return self._jwks_url() if callable(self._jwks_url) else self._jwks_url

    def refresh_keys(self) -> list[Ed25519PublicKey]:
        r = httpx.get(self.jwks_url, timeout=5)
        r.raise_for_status()
        keys = load_jwks_keys(r.json())
        with self._lock:
            self._keys = keys
        return keys

    def _verify(self, headers: dict[str, str], body: bytes) -> str | None:
        with self._lock:
            keys = list(self._keys)
        err = verify_signature(headers, body, keys)
        if err is not None and ("JWKS" in err or "any JWKS key" in err):
            try:  # keys may have rotated or the sidecar restarted: refetch once
                err = verify_signature(headers, body, self.refresh_keys())
            except Exception as exc:  # noqa: BLE001
                err = f"{err}; JWKS refetch failed: {exc!r}"
        return err

    # -- control -----------------------------------------------------------
    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def respond(self, path: str, *statuses: int) -> None:
        """Answer the next deliveries to `path` with these statuses, then 200."""
        with self._lock:
            self._responses.setdefault(path, []).extend(statuses)

    def start(self, fetch_keys: bool = True) -> "WebhookReceiver":
        if fetch_keys:
            try:
                self.refresh_keys()
            except Exception:  # noqa: BLE001 - verification refetches on demand
                pass
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                path = self.path
                with receiver._lock:
                    queue = receiver._responses.get(path.split("?")[0])
                    status = queue.pop(0) if queue else 200
                err = receiver._verify(headers, body)
                try:
                    parsed = json.loads(body)
                except ValueError:
                    parsed = None
                with receiver._lock:
                    receiver.deliveries.append(
                        Delivery(path, headers, body, time.time(), err, status, parsed)
                    )
                payload = b"{}"
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", receiver.url("/redirect-target"))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_PUT = do_GET = do_POST

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self._thread = None

    # -- queries -----------------------------------------------------------
    def for_request(self, request_id: str, ok_only: bool = True) -> list[Delivery]:
        with self._lock:
            out = []
            for d in self.deliveries:
                if ok_only and not 200 <= d.answered < 300:
                    continue
                rid = d.headers.get("x-fal-webhook-request-id")
                if rid == request_id or (isinstance(d.json, dict) and d.json.get("request_id") == request_id):
                    out.append(d)
            return out

    def attempts(self, path: str) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.path.split("?")[0] == path]

    def wait_for(self, request_id: str, timeout: float = 15.0) -> Delivery:
        """Wait for a delivery of `request_id` that we answered with 2xx; check
        that it verified."""
        found = wait_until(lambda: self.for_request(request_id), timeout=timeout,
                           what=f"webhook delivery for {request_id}")
        d = found[0]
        assert d.verified, f"webhook for {request_id} failed verification: {d.verify_error}"
        return d
