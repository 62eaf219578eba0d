"""Runs probes behind network profiles (edge): a fault proxy per side, in front of it the
kernel layer's namespaces where this machine has them, one probe per customer profile, and
the summaries side by side."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from chatprobe.config import TargetConfig
from chatprobe.errors import HarnessError
from chatprobe.netem import kernel
from chatprobe.netem.plan import DEFAULT_PORTS, proxy_faults, run_plan
from chatprobe.netem.proxy import FaultProxy
from chatprobe.probe import ProbeOptions, run_probe
from chatprobe.profiles import PlanItem, Profile
from chatprobe.verdict import document_status, worst


def tls_server_name(target_url: str) -> str | None:
    """The name a client behind a profile verifies the target's certificate against (and
    sends as SNI): the target's own host, since the URL it connects to names the proxy.
    None for a plain target."""
    parts = urlsplit(target_url)
    return parts.hostname if parts.scheme in ("https", "wss") else None


def via_proxy(config: TargetConfig, target_url: str) -> TargetConfig:
    """``config`` for connecting to ``target_url`` through :func:`behind`'s URL: TLS still
    verifies the target's own name (a name the config gives itself wins)."""
    name = tls_server_name(target_url)
    if name is None or config.tls_server_name is not None:
        return config
    return replace(config, tls_server_name=name)


def plan_here(profile: Profile, target_url: str) -> list[PlanItem]:
    """What a run on this machine applies of ``profile``: the proxy, and the kernel layer
    where it is available and not switched off."""
    caps, off = kernel.state()
    return run_plan(profile, target_url, caps, off)


@contextlib.asynccontextmanager
async def behind(target_url: str, profile: Profile | None,
                 seed: int | None = None) -> AsyncIterator[tuple[str, FaultProxy | None]]:
    """The URL to use for ``target_url`` seen through ``profile``: a proxy on loopback, or,
    when the profile has kernel parameters this machine can apply, a proxy listening inside
    the kernel layer's edge namespace on the target's own port, behind emulated routers.
    Over TLS the proxy forwards the encrypted bytes; a client connecting to the yielded URL
    verifies the certificate against the target's name (:func:`via_proxy`)."""
    if profile is None or profile.is_clean:
        yield target_url, None
        return
    parts = urlsplit(target_url)
    if parts.hostname is None:
        raise HarnessError(f"cannot put a network profile in front of {target_url}")
    port = parts.port or DEFAULT_PORTS.get(parts.scheme, 80)
    secure = parts.scheme in ("https", "wss")
    # Kernel work (detection, building, counters, removal) runs off the event loop: other
    # measurements on this loop (the canary's other targets) must not wait for it.
    spec = kernel.KernelSpec.from_plan(profile, await asyncio.to_thread(plan_here, profile,
                                                                         target_url))
    path = kernel.KernelPath(spec) if spec.active else None
    listen_sock: socket.socket | None = None
    try:
        if path is not None:
            # Building takes a few dozen ip/nft/tc commands: off the event loop. On
            # cancellation the finally below waits for the build, then removes it.
            await asyncio.to_thread(path.open)
            listen_sock = path.listen(port)
        proxy = FaultProxy(parts.hostname, port,
                           proxy_faults(profile, seed, secure, spec.parameters),
                           toxicity=profile.toxicity, seed=seed, listen_sock=listen_sock)
        await proxy.start()
        listen_sock = None  # the proxy's now
        try:
            host = path.address if path is not None else "127.0.0.1"
            yield urlunsplit(parts._replace(netloc=f"{host}:{proxy.port}")), proxy
        finally:
            await proxy.close()
            if path is not None:
                with contextlib.suppress(kernel.KernelError):
                    proxy.stats.kernel = await asyncio.to_thread(path.counters)
    finally:
        if listen_sock is not None:
            listen_sock.close()
        if path is not None:
            # Shielded: a cancelled caller still gets the path removed (the thread runs on).
            await asyncio.shield(asyncio.to_thread(path.close))


class ProxyThread:
    """:func:`behind` for synchronous callers (the swarm runner): the proxy runs on its own
    event loop in a thread of this process while Locust runs in its own processes."""

    def __init__(self, target_url: str, profile: Profile | None) -> None:
        self.target_url = target_url
        self.profile = profile
        self.url = target_url
        self.proxy: FaultProxy | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="chatprobe-proxy", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                async with behind(self.target_url, self.profile) as (url, proxy):
                    self.url, self.proxy = url, proxy
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc
                self._ready.set()

        asyncio.run(main())

    def __enter__(self) -> str:
        if self.profile is None or self.profile.is_clean:
            return self.target_url
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.url

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()


def annotate(doc: dict[str, Any], target_url: str, profile: Profile,
             agent_profile: Profile | None, proxies: dict[str, FaultProxy | None]
             ) -> dict[str, Any]:
    """A run's document, told which profiles it ran behind and what of them it applied."""
    doc["target"] = target_url
    doc["profile"] = profile.name
    doc["agent_profile"] = agent_profile.name if agent_profile else None
    plan = plan_here(profile, target_url)
    if agent_profile is not None:
        plan += [replace(item, parameter=f"agents: {item.parameter}")
                 for item in plan_here(agent_profile, target_url)]
    doc["emulation"] = [asdict(item) for item in plan]
    doc["proxy"] = {side: asdict(p.stats) for side, p in proxies.items() if p is not None}
    return doc


async def probe_profiles(target_url: str, config: TargetConfig, options: ProbeOptions,
                         profiles: list[Profile],
                         agent_profile: Profile | None) -> list[dict[str, Any]]:
    """One probe per customer profile, each a fresh run; the documents in order."""
    documents = []
    config = via_proxy(config, target_url)
    for profile in profiles:
        async with behind(target_url, profile) as (customer_url, proxy), \
                behind(target_url, agent_profile) as (agent_url, agent_proxy):
            if options.progress is not None:
                options.progress(f"profile {profile.name}: customers via {customer_url}")
            summary = await run_probe(customer_url, config, options, agent_url=agent_url)
        documents.append(annotate(summary.to_json(), target_url, profile, agent_profile,
                                  {"customers": proxy, "agents": agent_proxy}))
        if summary.partial:
            break  # stopped by a signal: the profiles after this one do not run
    return documents


def combine(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """Several profiles' documents as one: the worst status, one entry per profile."""
    # As the exit code judges each (an invalid run is UNKNOWN), so that the two agree.
    status = worst(document_status(doc) for doc in documents)
    return {"status": status.name, "exit_code": int(status),
            "valid": all(doc.get("valid", True) for doc in documents),
            "target": documents[0]["target"], "profiles": documents}


def render_side_by_side(documents: list[dict[str, Any]]) -> str:
    """One column per profile: what a person compares across networks."""
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, values: list[str]) -> None:
        rows.append((label, values))

    def ms(value: Any) -> str:
        return "-" if value is None else f"{value:.1f}"

    row("status", [d["status"] for d in documents])
    for key in ("sent", "delivered", "late", "lost", "duplicate", "reordered"):
        row(key, [str(d[key]) for d in documents])
    row("availability %", ["-" if d["availability"] is None else
                           f"{d['availability'] * 100:.2f}" for d in documents])
    for key, label in (("p50", "p50 ms"), ("p90", "p90 ms"), ("p99", "p99 ms"),
                       ("max", "max ms")):
        row(label, [ms(d["latency_ms"][key]) for d in documents])
    row("skipped params", [str(sum(not e["emulated"] for e in d["emulation"]))
                           for d in documents])
    width = max(12, *(len(d["profile"]) + 2 for d in documents))
    lines = [f"{'profile':<16}" + "".join(f"{d['profile']:>{width}}" for d in documents)]
    lines += [f"{label:<16}" + "".join(f"{v:>{width}}" for v in values)
              for label, values in rows]
    for doc in documents:
        for item in doc["emulation"]:
            if not item["emulated"]:
                lines.append(f"  {doc['profile']}: {item['parameter']} = {item['value']} "
                             f"not emulated ({item['why']})")
    return "\n".join(lines)


def render_emulation(doc: dict[str, Any]) -> str:
    """For a single profile: what the run applied and what it skipped."""
    lines = [f"  network profile {doc['profile']}"
             + (f" (agents: {doc['agent_profile']})" if doc.get("agent_profile") else "")]
    for item in doc["emulation"]:
        state = "applied" if item["emulated"] else "NOT emulated"
        lines.append(f"    {item['parameter']} = {item['value']}: {state} ({item['layer']}; "
                     f"{item['why']})")
    return "\n".join(lines)
