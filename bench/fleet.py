"""Fleet simulation: 10,000 nodes refreshing one-hour tokens against one shared STS quota.

Every node decides with wlidd's own scheduling code (wlidd.tokens.schedule: RefreshPolicy for the
next refresh (the first one drawn from the whole window), start_delay at boot, after_failure = backoff + Retry-After + last-good bound, exactly
as TokenSource calls them), on a simulated clock. Nodes boot with a realistic skew (a rolling start
over `--boot-window`). After the fleet settles, the upstream goes down for `--outage` seconds.

Measured, against a baseline run in the same process with the naive policy (no jitter, no start
delay, fixed 1 s retries — a cron job):
  - steady state: peak vs mean upstream calls per second (rates over 60 s windows, and raw 1 s buckets)
  - the outage: the peak retry rate (10 s windows, from the outage start to 30 min after its end) as
    a multiple of the steady mean, against a cap (`--cap`)
  - recovery: the peak rate in the 5 minutes after the outage ends vs the rate in its last minute
    (above 1 would be a thundering herd at recovery)
Targets: steady peak/mean ≤ 1.25 (60 s windows); outage peak ≤ cap; recovery ratio ≤ 1.25.

Then the node's side (bench/fleet_node.py; `--no-node` skips it): one real daemon under an ID-token
storm from 100 local users and an IAM upstream whose clock is 15 minutes ahead: upstream mints stay
within the guards' bound, and no token is served past its real expiry.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import random
from collections import Counter
from dataclasses import dataclass

from _common import Figure, report

from wlidd.tokens.model import Token
from wlidd.tokens.schedule import Backoff, RefreshPolicy, after_failure, start_delay

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@dataclass
class Result:
    calls: Counter[int]
    failures: int
    expired_seconds: int


def simulate(
    nodes: int,
    hours: float,
    *,
    jitter: float,
    start_spread: float,
    backoff_min: float,
    backoff_max: float,
    fixed_retry: float | None,
    boot_window: float,
    outage: tuple[float, float],
    randomize_first: bool = True,
    lifetime: float = 3600,
    seed: int = 7,
) -> Result:
    rng = random.Random(seed)
    policy = RefreshPolicy(refresh_at=0.8, jitter=jitter, skew=60, min_interval=1)
    tokens: list[Token | None] = [None] * nodes
    backoffs = [Backoff(backoff_min, backoff_max) for _ in range(nodes)]
    queue: list[tuple[float, int]] = []
    for node in range(nodes):
        boot = rng.uniform(0, boot_window)
        heapq.heappush(queue, (boot + start_delay(rng, start_spread), node))
    end = hours * 3600
    calls: Counter[int] = Counter()
    failures = 0
    expired = 0
    while queue:
        t, node = heapq.heappop(queue)
        if t > end:
            break
        now = T0 + dt.timedelta(seconds=t)
        calls[int(t)] += 1
        last = tokens[node]
        if outage[0] <= t < outage[1]:
            failures += 1
            if last is not None and last.seconds_left(now) <= 0:
                expired += 1
            if fixed_retry is not None:
                heapq.heappush(queue, (t + fixed_retry, node))
            else:
                when = after_failure(backoffs[node], now, rng, last, policy.skew)
                heapq.heappush(queue, ((when - T0).total_seconds(), node))
            continue
        token = Token("t", now + dt.timedelta(seconds=lifetime), now, "sim")
        first = tokens[node] is None
        tokens[node] = token
        backoffs[node].reset()
        when = policy.next_refresh(token, rng, first=first and randomize_first)
        heapq.heappush(queue, ((when - T0).total_seconds(), node))
    return Result(calls, failures, expired)


def window_rates(calls: Counter[int], start: int, stop: int, width: int) -> list[float]:
    return [sum(calls[s] for s in range(w, w + width)) / width for w in range(start, stop - width + 1, width)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--hours", type=float, default=10)
    parser.add_argument("--boot-window", type=float, default=300, help="seconds over which the fleet boots")
    parser.add_argument(
        "--outage-at", type=float, default=7 * 2880, help="default: when the naive fleet's herd refreshes"
    )
    parser.add_argument("--outage", type=float, default=600)
    parser.add_argument("--cap", type=float, default=15.0, help="outage retry peak limit, × the steady mean rate")
    parser.add_argument("--no-node", action="store_true", help="skip the real-daemon storm and skew phase")
    parser.add_argument("--storm-seconds", type=float, default=15.0, help="length of the ID-token storm")
    args = parser.parse_args()
    outage = (args.outage_at, args.outage_at + args.outage)
    common = {"nodes": args.nodes, "hours": args.hours, "boot_window": args.boot_window, "outage": outage}
    wlidd = simulate(**common, jitter=0.1, start_spread=30, backoff_min=1, backoff_max=300, fixed_retry=None)  # type: ignore[arg-type]
    naive = simulate(
        **common, jitter=0.0, start_spread=0, backoff_min=1, backoff_max=1, fixed_retry=1.0, randomize_first=False
    )  # type: ignore[arg-type]

    steady = (3 * 3600, int(args.outage_at))  # after three refresh cycles, before the outage
    around = (int(outage[0]), int(outage[1]) + 1800)
    print(
        f"{args.nodes} nodes, one-hour tokens, boot over {args.boot_window:g}s, outage {args.outage:g}s at t={args.outage_at:g}s"
    )
    print(
        f"{'policy':<8} {'mean/s':>7} {'peak/s 60s':>10} {'ratio':>6} {'peak/s 1s':>9} {'ratio':>6}"
        f" {'outage peak/s 10s':>17} {'x mean':>7} {'recovery':>8} {'expired':>7}"
    )
    figures = {}
    for name, result in (("wlidd", wlidd), ("naive", naive)):
        mean = sum(result.calls[s] for s in range(*steady)) / (steady[1] - steady[0])
        peak60 = max(window_rates(result.calls, *steady, 60))
        peak1 = max(result.calls[s] for s in range(*steady))
        outage_peak = max(window_rates(result.calls, *around, 10))
        last_minute = max(1e-9, sum(result.calls[s] for s in range(int(outage[1]) - 60, int(outage[1]))) / 60)
        after_peak = max(window_rates(result.calls, int(outage[1]), int(outage[1]) + 300, 10))
        figures[name] = (mean, peak60 / mean, outage_peak / mean, after_peak / last_minute)
        print(
            f"{name:<8} {mean:>7.2f} {peak60:>10.2f} {peak60 / mean:>6.2f} {peak1:>9d} {peak1 / mean:>6.2f}"
            f" {outage_peak:>17.1f} {outage_peak / mean:>7.1f} {after_peak / last_minute:>8.2f} {result.expired_seconds:>7d}"
        )
    _, steady_ratio, outage_ratio, recovery = figures["wlidd"]
    print(
        f"\nwlidd vs naive: steady peak/mean {steady_ratio:.2f} vs {figures['naive'][1]:.2f}; "
        f"outage retry peak {outage_ratio:.1f}x vs {figures['naive'][2]:.1f}x the mean"
    )
    print("(expired: failed calls made while the node's last token had already expired)")
    node_figures: list[Figure] = []
    if not args.no_node:
        import fleet_node

        node_figures = fleet_node.run(args.storm_seconds)
    return report(
        "fleet",
        [
            *node_figures,
            Figure(
                "fleet steady-state peak/mean upstream calls per second (60 s windows, 10,000 nodes)",
                f"{steady_ratio:.2f}x",
                "≤ 1.25x",
                steady_ratio <= 1.25,
            ),
            Figure(
                f"fleet retry peak during a {args.outage:g} s upstream outage (10 s windows)",
                f"{outage_ratio:.1f}x mean",
                f"≤ {args.cap:g}x mean",
                outage_ratio <= args.cap,
            ),
            Figure(
                "fleet after the outage ends: peak vs the outage's last minute (no herd)",
                f"{recovery:.2f}x",
                "≤ 1.25x",
                recovery <= 1.25,
            ),
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main())
