"""Reading a gRPC call's request messages on grpclib, with bounds: the Workload API's and SDS's calls.

The gRPC over HTTP/2 wire format (grpc/doc/PROTOCOL-HTTP2.md): a message is a 1-byte compressed flag, a
4-byte big-endian length, then that many bytes. The declared length is checked before any of the message is
read, so a client cannot make the daemon buffer more than the limit of the call.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

MAX_REQUEST_BYTES = 4096  # a request message's largest declared size; X509SVIDRequest and X509BundlesRequest are empty
REQUEST_TIMEOUT = 10.0  # seconds for the request message to arrive once a stream was authorized


async def read_message(
    stream: Stream[Any, Any],
    parse: Callable[[bytes], Any],
    *,
    limit: int = MAX_REQUEST_BYTES,
    timeout: float | None = REQUEST_TIMEOUT,
    rest_timeout: float | None = None,
    room: Callable[[int], AbstractAsyncContextManager[None]] | None = None,
) -> Any:
    """Read and decode the call's next message; None once the client ended its side of the call.

    A message declared (in its gRPC length prefix) larger than `limit` bytes is refused before any of it
    is read (grpclib's recv_message would read and acknowledge whatever size the prefix declares).
    `timeout`: seconds for the whole message to arrive (None: no limit). `rest_timeout`: seconds for the
    rest of the prefix once the message's first byte came, and again for its body (None: no limit but
    `timeout`): a half-sent message is not held longer, however long the call may stay idle between
    messages. `room(length)`: entered with the declared length before the body is read and held until it
    is parsed (a byte budget that may wait for room: wlidd.workload_api.sds_budget); its wait counts
    against `timeout` only. Raises GRPCError (RESOURCE_EXHAUSTED, INVALID_ARGUMENT, DEADLINE_EXCEEDED)."""
    data = stream._stream  # grpclib.protocol.Stream: reads DATA, acknowledging only what it returns
    try:
        with anyio.fail_after(timeout):
            first = await data.recv_data(1)
            if not first:
                return None
            prefix = first + await _rest(rest_timeout, data.recv_data(4))
            compressed, length = struct.unpack(">?I", prefix)
            if compressed:
                raise GRPCError(Status.INVALID_ARGUMENT, "compressed requests are not accepted")
            if length > limit:
                raise GRPCError(
                    Status.RESOURCE_EXHAUSTED, f"request message of {length} bytes refused (at most {limit})"
                )
            if room is None:
                return parse(await _rest(rest_timeout, data.recv_data(length)))
            async with room(length):
                return parse(await _rest(rest_timeout, data.recv_data(length)))
    except TimeoutError:
        raise GRPCError(Status.DEADLINE_EXCEEDED, f"no request message within {timeout:g} s") from None
    except AssertionError:  # grpclib's Buffer: the call ended inside a message
        raise GRPCError(Status.INVALID_ARGUMENT, "the request message was cut short") from None
    except AttributeError:
        # grpclib acknowledges DATA it hands out through its connection's transport, which it deletes when
        # the connection is lost: DATA received just before then raises here (a traceback per call, else)
        if not data.connection.is_closing():
            raise
        raise GRPCError(Status.UNAVAILABLE, "the connection closed") from None
    except DecodeError:
        raise GRPCError(Status.INVALID_ARGUMENT, "the request message is not a valid protobuf") from None


async def _rest(seconds: float | None, read: Awaitable[bytes]) -> bytes:
    """Await `read` (the rest of a message: a recv_data coroutine) for at most `seconds` (None: no limit);
    GRPCError DEADLINE_EXCEEDED past them."""
    with anyio.move_on_after(seconds):
        return await read
    raise GRPCError(Status.DEADLINE_EXCEEDED, f"a request message was left half-sent for {seconds:g} s")
