"""Identity material: pure functions over bytes, no event loop, `now` always passed in."""

from wlidd.svid.model import BundleSet, SpiffeId, Svid, TrustBundle

__all__ = ["BundleSet", "SpiffeId", "Svid", "TrustBundle"]
