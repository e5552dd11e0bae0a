"""Service logs across hosts: the messages between a caller, the managers and a task's agent.

Workers listen on no port, so a request for a task's log travels on a connection its agent opened:
- the agent holds GET /tasks/logs/requests: newline-delimited `LogRequest`s (and `{"type":"ping"}` lines);
- it answers one with POSTs of `LogBatch` to /tasks/logs/{id}; each reply (`LogReply`) says whether
  to go on (the caller may be gone);
- a caller (a manager's daemon) reads GET /admin/tasks/{task}/logs?tail=N&follow=1 as lines of
  `LogLine` (or `{"error": ...}`), from the manager that holds the task's node's stream.
Everything from a peer is parsed with these types and their bounds.
"""
from __future__ import annotations

from typing import Annotated

import msgspec

LINE_MAX = 16 * 1024          # characters of one log line (longer ones are split)
BATCH_LINES = 10_000          # lines in one POST (at most 256 KiB of text: daemon/tasklogs.py)
MAX_TAIL = 100_000            # --tail at most (-1: all that is kept)

RequestID = Annotated[str, msgspec.Meta(pattern=r"\A[a-f0-9]{32}\Z")]
TaskID = Annotated[str, msgspec.Meta(pattern=r"\A[a-z0-9]{1,64}\Z")]


class LogRequest(msgspec.Struct, kw_only=True, tag="request", tag_field="type", forbid_unknown_fields=True):
    id: RequestID
    task: TaskID
    tail: Annotated[int, msgspec.Meta(ge=-1, le=MAX_TAIL)] = -1
    follow: bool = False


class LogLine(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    ts: Annotated[str, msgspec.Meta(max_length=40)] = ""     # when this host's daemon read it (RFC 3339)
    text: Annotated[str, msgspec.Meta(max_length=LINE_MAX)]


class LogBatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    lines: Annotated[list[LogLine], msgspec.Meta(max_length=BATCH_LINES)] = []
    end: bool = False                   # no more lines will come
    error: Annotated[str, msgspec.Meta(max_length=256)] = ""


class LogReply(msgspec.Struct, kw_only=True):
    more: bool                          # False: the caller is gone, stop


class Ping(msgspec.Struct, tag="ping", tag_field="type"):
    pass


AgentMessage = LogRequest | Ping
