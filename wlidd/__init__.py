"""wlidd: a workload identity daemon for Linux nodes."""

__version__ = "0.1.0"
