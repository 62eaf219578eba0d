"""Allure categories for chatprobe's failures (pure): every diagnosis cause belongs to one
category, and a failed result's message starts with ``[category]`` so that Allure 2
(categories.json) and Allure 3 (allurerc ``categories``) sort it with one rule each.
"""

from __future__ import annotations

from typing import Any

from chatprobe.diagnosis import Cause

NETWORK = "network/firewall"
PERMISSION = "permission/routing"
PLATFORM = "platform loss"
SLA = "SLA breach"
HARNESS = "harness error"

CATEGORY_OF: dict[Cause, str] = {
    Cause.RECEIVE_PERMISSION: PERMISSION,
    Cause.WRONG_ROLE: PERMISSION,
    Cause.CHANNEL_PERMISSION: PERMISSION,
    Cause.BUSINESS_HOURS: PERMISSION,
    Cause.PRESENCE: PERMISSION,
    Cause.CAPACITY: PERMISSION,
    Cause.ROUTING_RULE: PERMISSION,
    Cause.FILTERED: PERMISSION,  # a shop's own keyword rule, fixed in its back office
    Cause.CLIENT_VERSION: PERMISSION,
    Cause.CONVERSATION_CLOSED: PERMISSION,
    Cause.CONVERSATION_TRANSFERRED: PERMISSION,
    Cause.AUTH_REJECTED: PERMISSION,
    Cause.SESSION_EXPIRED: PERMISSION,
    Cause.ACCOUNT_FROZEN: PERMISSION,
    Cause.PUSH_DISABLED: PLATFORM,
    Cause.PUSH_LOST: PLATFORM,
    Cause.PUSH_STALLED: PLATFORM,
    Cause.NOT_ACCEPTED: PLATFORM,
    Cause.PROTOCOL: PLATFORM,
    Cause.UNEXPLAINED: PLATFORM,
    Cause.TRANSPORT: NETWORK,
    Cause.DISCONNECTED: NETWORK,
    Cause.UPGRADE_REFUSED: NETWORK,
    Cause.TLS_EXPIRED: NETWORK,
    Cause.TLS_HOST_NAME: NETWORK,
    Cause.TLS_UNKNOWN_CA: NETWORK,
    Cause.TLS_FAILED: NETWORK,
    Cause.SLOW: SLA,
}
ORDER = (NETWORK, PERMISSION, PLATFORM, SLA, HARNESS)


def category_of(cause: str | Cause | None, broken: bool = False) -> str:
    """The category of a failure; ``broken`` (the harness could not judge) wins."""
    if broken:
        return HARNESS
    if cause is None:
        return PLATFORM
    try:
        return CATEGORY_OF[Cause(cause)]
    except ValueError:
        return PLATFORM


def message(category: str, text: str) -> str:
    """A failed result's statusDetails.message, prefixed so the category rules match it."""
    return f"[{category}] {text}"


def allure_categories() -> list[dict[str, Any]]:
    """The rules, in Allure's categories.json form (Allure 3 takes the same list)."""
    rules = []
    for name in ORDER:
        prefix = name.replace("/", "\\/")
        rules.append({
            "name": name,
            # Java's matches() needs the whole message, JavaScript's test() a part: this
            # pattern means the same to both. pytest.fail() messages reach Allure as
            # "Failed: <message>".
            "messageRegex": f"^(Failed: )?\\[{prefix}\\][\\s\\S]*$",
            "matchedStatuses": ["broken"] if name == HARNESS else ["failed"],
        })
    return rules
