"""SQLite persistence for the reference service: conversations and every accepted message.

A message is committed before it is acknowledged, so a crash or restart loses nothing that was
acked (WAL, synchronous=NORMAL: durable across process crashes; a power cut may lose the last
transactions, which is the trade-off real chat platforms make too).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    shop TEXT NOT NULL,
    customer TEXT NOT NULL,
    ref TEXT NOT NULL,
    channel TEXT NOT NULL,
    skill_group TEXT,
    agent TEXT,
    state TEXT NOT NULL DEFAULT 'open',
    created REAL NOT NULL,
    UNIQUE (shop, customer, ref)
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation INTEGER NOT NULL,
    direction TEXT NOT NULL,
    sender TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    text TEXT NOT NULL,
    ts REAL NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    agent TEXT,
    UNIQUE (conversation, direction, client_msg_id)
);
CREATE INDEX IF NOT EXISTS messages_by_agent ON messages (agent, id);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation, id);
"""


@dataclass
class ConversationRow:
    id: int
    shop: str
    customer: str
    ref: str
    channel: str
    skill_group: str | None
    agent: str | None
    state: str


@dataclass
class MessageRow:
    id: int
    conversation: int
    direction: str
    sender: str
    client_msg_id: str
    text: str
    ts: float
    status: str
    reason: str | None
    agent: str | None


class Store:
    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def open_conversation(self, shop: str, customer: str, ref: str, channel: str,
                          skill_group: str | None) -> tuple[ConversationRow, bool]:
        """Open (or find again, for a reconnecting customer) a conversation by its ref."""
        row = self.db.execute(
            "SELECT id, shop, customer, ref, channel, skill_group, agent, state"
            " FROM conversations WHERE shop=? AND customer=? AND ref=?",
            (shop, customer, ref)).fetchone()
        if row is not None:
            return ConversationRow(*row), False
        cursor = self.db.execute(
            "INSERT INTO conversations (shop, customer, ref, channel, skill_group, created)"
            " VALUES (?, ?, ?, ?, ?, ?)", (shop, customer, ref, channel, skill_group, time.time()))
        assert cursor.lastrowid is not None
        return ConversationRow(cursor.lastrowid, shop, customer, ref, channel, skill_group,
                               None, "open"), True

    def open_conversations(self) -> list[ConversationRow]:
        rows = self.db.execute(
            "SELECT id, shop, customer, ref, channel, skill_group, agent, state"
            " FROM conversations WHERE state='open'").fetchall()
        return [ConversationRow(*r) for r in rows]

    def set_agent(self, conversation: int, agent: str | None) -> None:
        self.db.execute("UPDATE conversations SET agent=? WHERE id=?", (agent, conversation))

    def close_conversation(self, conversation: int) -> None:
        self.db.execute("UPDATE conversations SET state='closed' WHERE id=?", (conversation,))

    def find_message(self, conversation: int, direction: str,
                     client_msg_id: str) -> MessageRow | None:
        row = self.db.execute(
            "SELECT * FROM messages WHERE conversation=? AND direction=? AND client_msg_id=?",
            (conversation, direction, client_msg_id)).fetchone()
        return MessageRow(*row) if row else None

    def add_message(self, conversation: int, direction: str, sender: str, client_msg_id: str,
                    text: str, status: str, reason: str | None, agent: str | None) -> MessageRow:
        ts = time.time()
        cursor = self.db.execute(
            "INSERT INTO messages (conversation, direction, sender, client_msg_id, text, ts,"
            " status, reason, agent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (conversation, direction, sender, client_msg_id, text, ts, status, reason, agent))
        assert cursor.lastrowid is not None
        return MessageRow(cursor.lastrowid, conversation, direction, sender, client_msg_id, text,
                          ts, status, reason, agent)

    def set_status(self, message_id: int, status: str, reason: str | None = None,
                   agent: str | None = None) -> None:
        self.db.execute("UPDATE messages SET status=?, reason=?, agent=COALESCE(?, agent)"
                        " WHERE id=?", (status, reason, agent, message_id))

    def last_message_id(self) -> int:
        (last,) = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()
        return int(last)

    def get_message(self, message_id: int) -> MessageRow | None:
        row = self.db.execute("SELECT * FROM messages WHERE id=?", (message_id,)).fetchone()
        return MessageRow(*row) if row else None

    def messages_with_status(self, conversation: int, status: str) -> list[MessageRow]:
        rows = self.db.execute(
            "SELECT * FROM messages WHERE conversation=? AND status=? ORDER BY id",
            (conversation, status)).fetchall()
        return [MessageRow(*r) for r in rows]

    def agent_backlog(self, shop: str, agent: str, after_id: int) -> list[MessageRow]:
        """Customer messages routed to ``agent`` that a resuming client may not have seen."""
        rows = self.db.execute(
            "SELECT m.* FROM messages m JOIN conversations c ON c.id = m.conversation"
            " WHERE c.shop=? AND m.agent=? AND m.id>? AND m.direction='in' AND m.status IN"
            " ('accepted', 'assigned', 'pushed') ORDER BY m.id",
            (shop, agent, after_id)).fetchall()
        return [MessageRow(*r) for r in rows]

    def customer_backlog(self, shop: str, customer: str, after_id: int) -> list[MessageRow]:
        rows = self.db.execute(
            "SELECT m.* FROM messages m JOIN conversations c ON c.id = m.conversation"
            " WHERE c.shop=? AND c.customer=? AND m.id>? AND m.direction='out' ORDER BY m.id",
            (shop, customer, after_id)).fetchall()
        return [MessageRow(*r) for r in rows]

    def active_conversation_counts(self) -> dict[tuple[str, str], int]:
        rows = self.db.execute(
            "SELECT shop, agent, COUNT(*) FROM conversations"
            " WHERE state='open' AND agent IS NOT NULL GROUP BY shop, agent").fetchall()
        return {(shop, agent): count for shop, agent, count in rows}
