"""The SPIFFE Workload API over a Unix socket: the node's rotating SVIDs and bundles, pushed to every
SPIFFE-aware client (go-spiffe, py-spiffe, Envoy SDS via spiffe-helper, ghostunnel --use-workload-api).

Served with grpclib (pure-Python gRPC on asyncio) because the caller must be identified by
SO_PEERCRED on the accepted socket, which grpcio does not expose (grpc/grpc#15511); grpclib's
stream gives the transport, and so the socket.
"""
