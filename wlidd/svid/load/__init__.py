"""The credentials edge: one identity's files read as a set, and turned into a validated Identity.

`CredentialSource.read()` (`source`) is the only file I/O: every file of the set through one resolution,
each in the layout of its source (`plans`: gce, certificate_config, files), each read as a regular file
(`files`); `load_identity()` (`retry`) retries a refused set quietly while it may be caught mid-write.
Parsing and validating the bytes read is pure (wlidd.svid.credential_set.build_identity).
"""
