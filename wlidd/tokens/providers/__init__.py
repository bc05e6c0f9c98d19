"""One module per upstream. Each takes an httpx.AsyncClient; errors become UpstreamError here."""
