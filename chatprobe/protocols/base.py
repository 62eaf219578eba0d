"""The protocol adapter interface: what chatprobe needs from a chat platform, both sides.

To point chatprobe at your own platform, subclass :class:`Adapter` (see docs/adapters.md) and
register it with :func:`register`. The core never sees sockets or server names: adapters turn
frames into calls of the ``on_receive`` callback and platform reasons into :class:`Cause`.

Contract:

* ``on_receive(text, server_id)`` is called once per message frame the client got, in arrival
  order, from the event loop thread. It must not block; the probe timestamps it.
* ``send`` returns once the frame is written; its ack arrives through the returned future,
  which fails with :class:`TargetError` if the connection is lost for good.
* Sessions reconnect by themselves (within the target's ``reconnect_window_s``) and resume
  from the last message they saw; unacked sends are resent with the same client id so the
  platform can deduplicate them.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from chatprobe.config import AgentCredential, TargetConfig
from chatprobe.diagnosis import AgentSelf, Cause
from chatprobe.errors import HarnessError, TargetError

OnReceive = Callable[[str, str | None], None]
# A frame as evidence: (monotonic µs, "in" or "out", the frame's text).
Frame = tuple[int, str, str]
OnEvent = Callable[[str, str], None]  # (event kind, detail): "disconnected", "resumed", ...
# Where a tagged send ends up, once: (the caller's tag, the target's message id, None) when
# acked, (tag, None, why) when refused or when the session died before the ack.
AckSink = Callable[[Any, str | None, TargetError | None], None]


@dataclass(frozen=True)
class Ack:
    server_id: str
    server_ts: float | None


@dataclass(frozen=True)
class Conversation:
    id: str
    state: str  # "assigned", "queued", "closed", or "open" when the platform does not say
    agent: str | None = None


class CustomerSession(ABC):
    @property
    @abstractmethod
    def failure(self) -> TargetError | None:
        """Why this session is gone for good (after reconnects failed); None while alive."""

    @abstractmethod
    async def open_conversation(self, ref: str, channel: str) -> Conversation: ...

    @abstractmethod
    async def send(self, conversation: str, client_msg_id: str,
                   text: str) -> asyncio.Future[Ack]: ...

    def send_soon(self, conversation: str, client_msg_id: str,
                  text: str) -> asyncio.Future[Ack] | None:
        """:meth:`send` without a coroutine, for adapters whose send never waits (the
        swarm's per-message path); None: this adapter cannot, use :meth:`send`."""
        return None

    def send_tagged(self, conversation: str, client_msg_id: str, text: str, tag: Any,
                    sink: AckSink) -> bool:
        """:meth:`send_soon` without a future: the outcome goes to ``sink`` with ``tag``
        (tens of thousands a second in a swarm: no future, callback or closure each).
        False: this adapter cannot, use :meth:`send_soon`."""
        return False

    async def close_conversation(self, conversation: str) -> None:  # noqa: B027
        """End the conversation as a customer who is done (optional; default: nothing)."""

    def drop_connection(self) -> bool:
        """Cut the connection without goodbye, as a mobile network does, and let the session
        reconnect by itself. False when the adapter cannot (the swarm then skips it)."""
        return False

    def recent_frames(self) -> list[Frame]:
        """The last frames this session sent and received, when the adapter keeps them
        (``Adapter.frame_log_size``); evidence around a lost message."""
        return []

    @abstractmethod
    async def close(self) -> None: ...


class AgentSession(ABC):
    profile: AgentSelf

    @property
    @abstractmethod
    def failure(self) -> TargetError | None:
        """Why this session is gone for good (after reconnects failed); None while alive."""

    @abstractmethod
    async def reply(self, conversation: str, client_msg_id: str,
                    text: str) -> asyncio.Future[Ack]: ...

    async def reply_to(self, server_id: str, client_msg_id: str,
                       text: str) -> asyncio.Future[Ack] | None:
        """Answer the message this session received with ``server_id`` (in its conversation).
        None when the adapter cannot tell which conversation that was."""
        return None

    def reply_to_soon(self, server_id: str, client_msg_id: str,
                      text: str) -> asyncio.Future[Ack] | Literal[False] | None:
        """:meth:`reply_to` without a coroutine, for adapters whose reply never waits
        (returns and raises as reply_to does); False: this adapter cannot, use reply_to."""
        return False

    def reply_tagged(self, server_id: str, client_msg_id: str, text: str, tag: Any,
                     sink: AckSink) -> bool | None:
        """:meth:`reply_to_soon` with its outcome going to ``sink``, as
        CustomerSession.send_tagged. True: sent; None: the adapter cannot tell which
        conversation ``server_id`` was in; False: this adapter cannot, use reply_to_soon."""
        return False

    def recent_frames(self) -> list[Frame]:
        """As CustomerSession.recent_frames."""
        return []

    @abstractmethod
    async def close(self) -> None: ...


@dataclass(frozen=True)
class Explanation:
    """The platform's own account of a message (its push log), mapped to a cause."""

    cause: Cause | None
    detail: str
    hops: dict[str, float | str | None]


class Adapter(ABC):
    """One chat platform. Created per run with the target URL and its config."""

    name = "abstract"

    def __init__(self, target_url: str, config: TargetConfig) -> None:
        self.target_url = target_url
        self.config = config
        # How many frames each session keeps for evidence (0: none, the swarm's default).
        self.frame_log_size = 0

    @abstractmethod
    async def connect_customer(self, customer_id: str, on_receive: OnReceive,
                               on_event: OnEvent) -> CustomerSession: ...

    @abstractmethod
    async def login_agent(self, credential: AgentCredential, on_receive: OnReceive,
                          on_event: OnEvent) -> AgentSession: ...

    async def explain(self, server_id: str, probe_agents: frozenset[str]) -> Explanation | None:
        """Ask the platform where a message went; None when the platform cannot tell."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release shared resources (HTTP clients)."""


_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    _REGISTRY[cls.name] = cls
    return cls


def adapter_for(protocol: str) -> type[Adapter]:
    """The adapter class for a config's ``protocol``: a registered name, or ``module:Class``
    for an adapter of your own that lives outside chatprobe."""
    # Import the built-in adapters so they register themselves.
    from chatprobe.protocols import matrix, reference, xmpp  # noqa: F401

    if ":" in protocol:
        module_name, _, class_name = protocol.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # any import failure of a user's module is a config error
            raise HarnessError(f"cannot import adapter module {module_name!r}: "
                               f"{type(exc).__name__}: {exc}") from None
        cls = getattr(module, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Adapter)) or inspect.isabstract(cls):
            raise HarnessError(f"{protocol!r} is not a concrete Adapter subclass")
        return cls
    try:
        return _REGISTRY[protocol]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise HarnessError(f"unknown protocol {protocol!r} (known: {known}, "
                           "or module:Class)") from None
