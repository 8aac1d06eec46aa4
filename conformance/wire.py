"""The kit's client side: sockets that record what the server did, HTTP, and tokens (PROTOCOL
Transport section, section 2).

A :class:`Socket` is a WebSocket client (websockets' threaded client, so Hypothesis rules stay
synchronous) whose reader thread appends every server frame and the close, with its arrival
time, to an ordered list of :class:`Obs`. Nothing here interprets an observation; the oracle does.
The client answers server pings (section 6), never pings itself.
"""

from __future__ import annotations

import contextlib
import json
import socket as socketlib
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from .errors import KitError


@dataclass(frozen=True)
class Obs:
    """One thing the server did on a socket: a frame (``frame``) or the end (``close``)."""

    t: float
    frame: dict[str, Any] | None = None
    text: str = ""
    close: tuple[int, str] | None = None  # (code, reason); (1006, "") when no close frame came
    no_close_frame: bool = False

    def show(self) -> str:
        if self.frame is not None:
            keys = ("type", "code", "request_id", "run_id", "seq", "event", "attempt", "context_id", "epoch")
            return "frame " + json.dumps({k: self.frame[k] for k in keys if k in self.frame})
        if self.no_close_frame:
            return "connection dropped without a close frame"
        return f"close {self.close}" if self.close else self.text


class Socket:
    """One client socket to ``url``; ``obs`` grows as the server speaks."""

    def __init__(self, url: str, label: str, open_timeout: float) -> None:
        self.label = label
        self.opened = time.monotonic()
        try:
            self.ws: ClientConnection = connect(url, open_timeout=open_timeout, ping_interval=None,
                                                close_timeout=1.0, max_size=2**22)
        except InvalidStatus as exc:
            raise KitError(f"{url}: the WebSocket upgrade was refused ({exc.response.status_code})") from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise KitError(f"{url}: cannot open a WebSocket: {type(exc).__name__}: {exc}") from None
        self.obs: list[Obs] = []
        self.read = 0  # observations already given to the oracle
        self._cv = threading.Condition()
        self.dropped = False
        self.ended = False
        self._reader = threading.Thread(target=self._read_loop, name=f"kit-{label}", daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        while True:
            try:
                message = self.ws.recv()
            except ConnectionClosed as closed:
                rcvd = closed.rcvd
                obs = (Obs(time.monotonic(), close=(rcvd.code, rcvd.reason)) if rcvd is not None
                       else Obs(time.monotonic(), close=(1006, ""), no_close_frame=True))
                self._push(obs, end=True)
                return
            except OSError:
                self._push(Obs(time.monotonic(), close=(1006, ""), no_close_frame=True), end=True)
                return
            text = message if isinstance(message, str) else message.decode("utf-8", "replace")
            try:
                frame = json.loads(text)
            except json.JSONDecodeError:
                frame = None
            self._push(Obs(time.monotonic(), frame=frame if isinstance(frame, dict) else None, text=text[:200]))

    def _push(self, obs: Obs, end: bool = False) -> None:
        with self._cv:
            self.obs.append(obs)
            if end:
                self.ended = True
            self._cv.notify_all()

    def send(self, frame: Mapping[str, Any] | str) -> None:
        """Send one text frame; a socket the server already closed just drops it (the oracle sees the close)."""
        text = frame if isinstance(frame, str) else json.dumps(frame)
        try:
            self.ws.send(text)
        except (ConnectionClosed, OSError):
            return

    def wait(self, pred: Callable[[Obs], bool], timeout: float) -> Obs | None:
        """Block until an unread observation satisfies ``pred`` (or the socket ended), up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for o in self.obs[self.read:]:
                    if pred(o):
                        return o
                if self.ended:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)

    def take(self) -> list[Obs]:
        """The observations the oracle has not seen yet, in arrival order."""
        with self._cv:
            new = self.obs[self.read:]
            self.read = len(self.obs)
            return new

    def drop(self, graceful: bool) -> None:
        """The client goes away: a close handshake (1000), or the TCP connection cut without one."""
        self.dropped = True
        if graceful:
            with contextlib.suppress(ConnectionClosed, OSError):
                self.ws.close(1000, "bye")
        else:
            with contextlib.suppress(OSError):
                self.ws.socket.shutdown(socketlib.SHUT_RDWR)
            self.ws.close_socket()
        self._reader.join(timeout=2.0)


@dataclass
class Tokens:
    """Mints tokens with the shared secret (HS256), or hands out ones given on the command line."""

    secret: str | None
    audience: str | None = None
    account: str = "conformance"
    given: dict[str, str] = field(default_factory=dict)

    @property
    def can_mint(self) -> bool:
        return self.secret is not None

    def good(self, user: str) -> str:
        if user in self.given:
            return self.given[user]
        return self._sign({"sub": user})

    def _sign(self, claims: dict[str, Any], key: str | None = None, now: float | None = None) -> str:
        if self.secret is None:
            raise KitError("minting tokens needs the server's secret (--secret or PIPEPROOF_JWT_SECRET)")
        t = int(time.time() if now is None else now)
        base: dict[str, Any] = {"account": self.account, "iat": t, "nbf": t, "exp": t + 3600}
        if self.audience is not None:
            base["aud"] = self.audience
        base.update(claims)
        return jwt.encode(base, key or self.secret, algorithm="HS256")

    def bad(self, kind: str, user: str) -> str | None:
        """A token that must be refused with close reason ``kind`` (PROTOCOL section 2)."""
        if kind == "token_missing":
            return None
        if kind == "token_malformed":
            return "not-a-jwt"
        if kind == "token_bad_signature":
            return self._sign({"sub": user}, key="another-key-" + uuid.uuid4().hex)
        if kind == "token_expired":
            return self._sign({"sub": user, "exp": int(time.time()) - 60, "iat": int(time.time()) - 120,
                               "nbf": int(time.time()) - 120})
        if kind == "token_not_yet_valid":
            return self._sign({"sub": user, "nbf": int(time.time()) + 600, "iat": int(time.time())})
        if kind == "token_bad_audience":
            return self._sign({"sub": user, "aud": "not-this-server-" + uuid.uuid4().hex[:6]})
        if kind == "user_unknown":
            return self._sign({"sub": ""})
        raise KitError(f"no bad token of kind {kind!r}")

    def bad_kinds(self) -> tuple[str, ...]:
        if self.can_mint:
            return ("token_missing", "token_malformed", "token_bad_signature", "token_expired",
                    "token_not_yet_valid", "token_bad_audience", "user_unknown")
        return ("token_missing", "token_malformed")


class Http:
    """The two /v1/ endpoints and their auth (PROTOCOL Transport section, section 5)."""

    def __init__(self, base: str, timeout: float) -> None:
        self.base = base.rstrip("/")
        self.client = httpx.Client(timeout=timeout)

    def get(self, path: str, token: str | None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        try:
            r = self.client.get(self.base + path, headers=headers)
        except httpx.HTTPError as exc:
            raise KitError(f"GET {path}: {type(exc).__name__}: {exc}") from None
        try:
            return r.status_code, r.json()
        except json.JSONDecodeError:
            return r.status_code, {"_not_json": r.text[:200]}

    def close(self) -> None:
        self.client.close()


def urls(target: str) -> tuple[str, str]:
    """(ws url of /v1/ws, http base) from ``ws://host:port`` (a path, if given, is kept)."""
    if not target.startswith(("ws://", "wss://")):
        raise KitError(f"not a WebSocket URL: {target!r} (expected ws://HOST:PORT)")
    scheme, rest = target.split("://", 1)
    host, _, path = rest.partition("/")
    ws = f"{scheme}://{host}/{path or 'v1/ws'}"
    http = f"{'https' if scheme == 'wss' else 'http'}://{host}"
    return ws, http


__all__ = ["Http", "Obs", "Socket", "Tokens", "urls"]
