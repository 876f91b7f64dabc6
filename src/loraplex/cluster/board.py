"""ReplicaBoard: one small Serve deployment where engine replicas publish their reports and pick up commands
for all of them (Ray Serve routes a call to one replica; a broadcast needs each replica to come and read it).
The ingress reads the live reports for /metrics and /v1/models, and posts commands such as resetting every
prefix cache. State only: routing stays Ray Serve's."""

from __future__ import annotations

import time

from ray import serve

from loraplex.cluster.messages import ReplicaReport

# A replica silent this long is gone (killed, or its node lost): left out of the cluster's state.
STALE_AFTER_S = 3.0


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class ReplicaBoard:
    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, ReplicaReport]] = {}
        self._commands: list[str] = []

    def report(self, report: ReplicaReport) -> tuple[list[tuple[int, str]], int]:
        """Store a replica's report; returns the commands it has not run yet (seq, command) and the latest seq.
        A new replica (acked -1) starts at the latest seq: commands posted before it existed do not concern it."""
        self._reports[report.view.id] = (time.monotonic(), report)
        start = len(self._commands) if report.acked < 0 else report.acked
        return [(i + 1, c) for i, c in enumerate(self._commands) if i >= start], len(self._commands)

    def post(self, command: str) -> int:
        self._commands.append(command)
        return len(self._commands)

    def reports(self) -> list[ReplicaReport]:
        """The live replicas' latest reports, by replica id."""
        now = time.monotonic()
        for rid in [r for r, (t, _) in self._reports.items() if now - t > STALE_AFTER_S]:
            del self._reports[rid]
        return [rep for _, rep in sorted(self._reports.values(), key=lambda tr: tr[1].view.id)]
