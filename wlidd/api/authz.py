"""The audit trail of what the edges hand out, naming the caller each time.

Who a caller is comes from `wlidd.api.peers`, what it may have from `wlidd.policy`; this module writes
what was handed to whom: at most a line per caller, secret and subject, so asking again for what it
already holds adds nothing to the trail. Every line names the caller (uid, gid, pid and user of a local
caller, and its unit, user unit and executable when a rule made wlidd read them; an mTLS caller's SPIFFE
ID) and never carries the secret itself.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from wlidd.logs import AuditOnce, get_logger
from wlidd.policy import Caller

audit = get_logger("wlidd.audit")


def caller_fields(caller: Caller) -> dict[str, object]:
    """Audit fields naming a caller: uid, gid, pid and user of a local caller (with its unit, user_unit
    and exe when they were read: wlidd.workload), or an mTLS SPIFFE ID."""
    if caller.spiffe_id is not None:
        return {"spiffe_id": str(caller.spiffe_id)}
    fields: dict[str, object] = {"uid": caller.uid, "gid": caller.gid, "pid": caller.pid, "user": caller.user}
    if caller.process is not None:
        fields.update(caller.process.fields())
    return fields


def process_fields(caller: Caller) -> dict[str, str]:
    """The unit, user_unit and exe of a caller whose process was read (else none), for log lines that
    name a caller by its own fields."""
    return caller.process.fields() if caller.process is not None else {}


def handout_audit(seen: AuditOnce, event: str, caller: Caller, what: str, marker: Hashable, **fields: Any) -> None:
    """Audit a secret handed out, at most once per uid (and unit, when read; or SPIFFE ID), `what` and
    secret (`marker`: a token's expiry, a certificate's serial): the first hand-out is always a line naming the caller; the
    same secret to another process of that uid is a line through the repeat limiter (3 a minute, then
    counted: wlidd.logs), so a loop — even one that forks a process per request — cannot flood the trail.
    """
    mtls = caller.spiffe_id is not None
    who: Hashable = str(caller.spiffe_id) if mtls else caller.uid
    if caller.process is not None and caller.process.unit is not None:
        who = (caller.uid, caller.process.unit)  # services sharing a uid: each one's first hand-out is a line
    first = seen.changed((event, who, what), marker)
    this_process = mtls or seen.changed((event, who, what, caller.pid), marker)
    if first:
        audit.info(event, **fields, **caller_fields(caller))
    elif this_process and not mtls:
        extra = process_fields(caller)
        audit.limited(
            "info", event, key={"uid": caller.uid, "what": what}, pid=caller.pid, user=caller.user, **fields, **extra
        )
