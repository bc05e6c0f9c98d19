"""Identity material: pure functions over bytes, no event loop, `now` always passed in."""

from wlidd.svid.model import BundleSet, Svid, TrustBundle
from wlidd.svid.spiffeid import SpiffeId, TrustDomain

__all__ = ["BundleSet", "SpiffeId", "Svid", "TrustBundle", "TrustDomain"]
