"""The local HTTP/1.1 API: h11 server core, routes, listeners."""
