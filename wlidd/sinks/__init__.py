"""File outputs for consumers that read from disk: credential sinks published one generation at a time, token
files replaced by one rename. A reader never sees half a file, nor a key from one generation with a chain
from another.

Credential sinks follow Kubernetes' atomic writer (pkg/volume/util/atomic_writer.go): each generation's
files go into a fresh hidden directory `<dir>/..<UTC time>.<random>` (every file written with its mode,
ACL and owner, and fsynced), then the link `..data_tmp -> ..<generation>` is renamed over `<dir>/..data`
(the one atomic step), then the stable names `<dir>/<file> -> ..data/<file>` are made (once; left alone
after), then the old generation is removed. A write that fails before the rename changes nothing a reader
sees. Consumers watch the directory for the move of `..data` (Envoy's watched_directory does), or resolve
`..data` once and read every file of a set through it, or use the single-file layout ("spiffe-fs"), or
on_change/signal. The check before a write is cheap, so every sink is brought up to date (missing, stale or
changed files rewritten; current ones left alone) on start, on every rotation, on SIGHUP, after a config
change and periodically (ensure_credentials, ensure_token). Layouts, one naming scheme each, matching
their consumers (layout_files): "files" (cert.pem, key.pem, bundle.pem, certificate_config.json),
"spiffe-helper" (svid.pem, svid_key.pem, svid_bundle.pem) and "spiffe-fs" (the SPIFFE Filesystem Delivery
draft: credential-bundle.private-key.pem, <trust domain>.spiffe-trust-bundle.pem). `wlidd creds --out`
writes through the same code.

The daemon may run as root while the directories it writes into are reachable by other users, so every
path is walked from / one component at a time (openat with O_NOFOLLOW, `wlidd.safedir`): each directory on
the way must belong to root or to the daemon's own user and must not be writable by anyone else (a sticky,
world-writable directory such as /tmp is accepted: others cannot move what root or the daemon put there,
but any user may hold a name there first, which is reported as such). A symbolic link is followed only
when it, too, belongs to root or the daemon's user. Files are then created (O_EXCL) and renamed relative
to the directory's descriptor, so nothing can swap a parent midway. Leftovers of a crash (temp files and
links, generation directories `..data` does not lead to, `..data_tmp`) are removed when root or the
daemon's user owns them, and left alone (and never in the way) when another user does.

`readers` grants users and groups read access through a POSIX ACL set on each file before it is
published (wlidd.posix_acl), and read/traverse on the sink directory; it needs no capability.

An optional command runs after each change: argv list (never a shell), with a timeout, a minimal
environment and bounded output, whose logged tail is masked of anything that could be the secret. An
optional signal goes to the process in pid_file, after checks on the file, its directory and the
process (through a pidfd, so the process checked is the one signalled). Commands and signals run only for
sinks that were actually (re)written, once every sink is, concurrently (one task per sink). Publications
of one identity or token source are serialized.

The modules, lowest first (each imports only those above it in this list):
problems (how a failure is told and remembered), access (readers, owners, ACLs, capabilities), locks
(serializing writers), files (one file in one rename; is a file current), commands (on_change), layouts
(the files of each layout: pure), generation_dirs and generations (the atomic writer), signals (pid_file),
tokens and credentials (the sinks of a token source and of an identity), check (`wlidd check`).
"""
