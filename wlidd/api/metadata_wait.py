"""ETags and waits (the real server's "wait for change", as its clients use it: Go's `metadata.Subscribe`,
the guest agent's watcher, google-cloud-dotnet's `WaitForChange`, Google's `compute/metadata` samples):
  - every value, listing and recursive answer carries `ETag: <16 hex digits>`, a hash of its body (the
    real server's form: google-cloud-dotnet validates ETags as `[a-zA-Z0-9]{16}`), so a directory's
    recursive and plain answers have different ETags, as on the real server;
  - `?wait_for_change=true` on a value or a recursive directory: with `last_etag` different from the
    current ETag (the guest agent's first `NONE`, the samples' `0`), the current answer at once; with the
    current one, or without `last_etag` (the real server then waits for the next change), the request is
    held until the answer's ETag changes (a reload that replaces the source: its scopes, its account) or
    `timeout_sec` (whole seconds; absent or larger: MAX_WAIT_SECONDS) passes, then answered with what is
    current; on a plain listing 400 (the real server refuses it: waits need `recursive=true` there); on the
    `token` and `identity` endpoints 400 (a token is not a value to watch: it changes on every refresh);
  - held requests are bounded: per caller uid max_connections_per_caller // 2 and per listener
    max_connections // 2 at once (beyond: 503 + Retry-After, from which Subscribe backs off), so waits can
    never take every connection; the HTTP layer keeps watching a held request's connection (`holds`) and
    drops it when the client goes away, and answers them all at once when the server stops
    (`release_holds`). A held request is "busy" to the HTTP layer: no idle deadline applies to it.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

from wlidd.api.messages import Request, Response
from wlidd.api.metadata_tree import FLAVOR, Endpoint, text_answer

MAX_WAIT_SECONDS = 3600  # the longest a wait is held (absent or larger timeout_sec: this); wlidd's bound
RECHECK_SECONDS = 5.0  # a held request looks at its value again at least this often (besides notify_changed)
HOLD_RETRY_AFTER = 5  # seconds, on the 503 answering a wait beyond the hold caps


class Holds:
    """The wait_for_change requests one metadata listener holds, bounded per caller uid and in all."""

    def __init__(self, max_connections: int, max_connections_per_caller: int) -> None:
        self._changed: anyio.Event | None = None  # made by the first wait (an Event needs a running loop)
        self._closing = False
        self._holds: dict[int | None, int] = {}  # held wait_for_change requests per caller uid
        self.max_holds = max(1, max_connections // 2)
        self.max_holds_per_caller = max(1, max_connections_per_caller // 2)

    @property
    def held(self) -> int:
        """wait_for_change requests held now."""
        return sum(self._holds.values())

    def notify_changed(self) -> None:
        """What is served may have changed: held waits look at their value again now."""
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def release(self) -> None:
        """The server is stopping: every held wait answers now, and new ones are answered at once."""
        self._closing = True
        self.notify_changed()

    async def wait(
        self, request: Request, answer: Response, again: Callable[[], tuple[Response | Endpoint, bool]]
    ) -> Response:
        """`answer` (the current one) at once when `last_etag` names another ETag; else the first answer
        whose ETag differs from the current one, or the current answer once `timeout_sec` passed (module
        docstring: the real server's wait_for_change, bounded). `again()`: the answer as it is now."""
        raw_timeout = request.query.get("timeout_sec", [str(MAX_WAIT_SECONDS)])[-1]
        if not raw_timeout.isdigit() or not raw_timeout.isascii():
            return text_answer(400, f"timeout_sec must be a whole number of seconds, not {raw_timeout[:32]!r}")
        digits = raw_timeout.lstrip("0") or "0"
        timeout = MAX_WAIT_SECONDS if len(digits) > 5 else min(int(digits), MAX_WAIT_SECONDS)
        current = dict(answer.headers)["etag"]
        last = request.query.get("last_etag", [None])[-1]
        if (last is not None and last != current) or self._closing:
            return answer
        uid = request.peer.uid
        if self._holds.get(uid, 0) >= self.max_holds_per_caller or self.held >= self.max_holds:
            who = f"uid {uid}" if uid is not None else "unidentified callers"
            return Response(
                503,
                f"too many wait_for_change requests held (for {who} at most {self.max_holds_per_caller}, for "
                f"everyone at most {self.max_holds}); retry later".encode(),
                "application/text",
                (*FLAVOR, ("retry-after", str(HOLD_RETRY_AFTER))),
            )
        self._holds[uid] = self._holds.get(uid, 0) + 1
        try:
            deadline = anyio.current_time() + timeout
            while not self._closing and (left := deadline - anyio.current_time()) > 0:
                if self._changed is None:
                    self._changed = anyio.Event()
                with anyio.move_on_after(min(left, RECHECK_SECONDS)):
                    await self._changed.wait()
                now, _ = again()
                if not isinstance(now, Response) or now.status != 200 or dict(now.headers).get("etag") != current:
                    return (
                        now if isinstance(now, Response) else text_answer(404, f"{request.path} is no longer a value")
                    )
                answer = now
            return answer
        finally:
            held = self._holds.pop(uid, 1) - 1
            if held:
                self._holds[uid] = held
