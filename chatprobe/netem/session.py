"""Runs probes behind network profiles (edge): a fault proxy per side, one probe per customer
profile, and the summaries side by side."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from chatprobe.config import TargetConfig
from chatprobe.errors import HarnessError
from chatprobe.netem.plan import proxy_faults, run_plan
from chatprobe.netem.proxy import FaultProxy
from chatprobe.probe import ProbeOptions, run_probe
from chatprobe.profiles import Profile
from chatprobe.verdict import Status

DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


@contextlib.asynccontextmanager
async def behind(target_url: str, profile: Profile | None,
                 seed: int | None = None) -> AsyncIterator[tuple[str, FaultProxy | None]]:
    """The URL to use for ``target_url`` seen through ``profile`` (a proxy on loopback)."""
    if profile is None or profile.is_clean:
        yield target_url, None
        return
    parts = urlsplit(target_url)
    if parts.hostname is None:
        raise HarnessError(f"cannot put a network profile in front of {target_url}")
    port = parts.port or DEFAULT_PORTS.get(parts.scheme, 80)
    proxy = FaultProxy(parts.hostname, port, proxy_faults(profile, seed),
                       toxicity=profile.toxicity, seed=seed)
    await proxy.start()
    try:
        yield urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxy.port}")), proxy
    finally:
        await proxy.close()


async def probe_profiles(target_url: str, config: TargetConfig, options: ProbeOptions,
                         profiles: list[Profile],
                         agent_profile: Profile | None) -> list[dict[str, Any]]:
    """One probe per customer profile, each a fresh run; the documents in order."""
    documents = []
    for profile in profiles:
        async with behind(target_url, profile) as (customer_url, proxy), \
                behind(target_url, agent_profile) as (agent_url, agent_proxy):
            if options.progress is not None:
                options.progress(f"profile {profile.name}: customers via {customer_url}")
            summary = await run_probe(customer_url, config, options, agent_url=agent_url)
        summary.target = target_url
        doc = summary.to_json()
        doc["profile"] = profile.name
        doc["agent_profile"] = agent_profile.name if agent_profile else None
        plan = run_plan(profile, target_url)
        if agent_profile is not None:
            plan += [item.__class__(f"agents: {item.parameter}", item.value, item.layer,
                                    item.emulated, item.why)
                     for item in run_plan(agent_profile, target_url)]
        doc["emulation"] = [asdict(item) for item in plan]
        doc["proxy"] = {side: asdict(p.stats) for side, p in
                        (("customers", proxy), ("agents", agent_proxy)) if p is not None}
        documents.append(doc)
    return documents


def combine(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """Several profiles' documents as one: the worst status, one entry per profile."""
    worst = max(documents, key=lambda d: int(Status[str(d["status"])]))
    return {"status": worst["status"], "exit_code": worst["exit_code"],
            "target": worst["target"], "profiles": documents}


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
