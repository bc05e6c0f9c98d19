"""The calling process as a workload: its systemd unit, its cgroup, its executable and that file's SHA-256.

Pure parts (the placement of `wlidd.workload` in the layer table: README "Architecture"):
  - `wlidd.workload.units`: systemd unit names (systemd.unit(5)) and the unit a cgroup path names, as
    systemd's own `sd_pid_get_unit` / `sd_pid_get_user_unit` name it (src/basic/cgroup-util.c);
  - `wlidd.workload.model`: what the policy needs read (`Need`), what was read (`ProcessFacts`), and the
    config's selector values (executables, sha256).
The edges that read the kernel (one layer up, with the other readers of files):
  - `wlidd.workload.proc`: a peer's pidfd (SO_PEERPIDFD, else pidfd_open with a start-time check), its
    /proc entries read while that pidfd names a live process (so a reused pid never lends its rights);
  - `wlidd.workload.digest`: SHA-256 of executables, once per file version, off the event loop;
  - `wlidd.workload.exefile`: which file system an executable is on (procfs only), and opening it off
    the event loop with a timeout and a bound on stuck threads.
"""
