"""The short soak in the test command (the long one: scripts/soak.sh MINUTES).

One run of tests/soak/soak.py: `fal-operator local` on a 3-master Redis Cluster, three
functions scaling 0↔N, both official clients, and every fault of the schedule once
(replica kill -9, app crash, master failover, a 5 s link cut, the webhook receiver down
30 s). Nothing acknowledged may be lost; see soak.Report.problems() for the verdict."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import wallclock  # noqa: E402  (tests/wallclock.py)
from soak import REPO, Soak  # noqa: E402

SECONDS = float(os.environ.get("FAL_SOAK_SECONDS", "100"))
OPERATOR_BIN = Path(os.environ.get("FAL_OPERATOR_BIN", REPO / "target" / "debug" / "fal-operator"))
SIDECAR_BIN = Path(os.environ.get("FAL_SIDECAR_BIN", REPO / "target" / "debug" / "fal-sidecar"))


def test_short_soak_loses_nothing(tmp_path):
    soak = Soak(tmp_path / "soak", SECONDS, OPERATOR_BIN, SIDECAR_BIN)
    # traffic + draining + webhook retries past the receiver's outage
    with wallclock.limit(SECONDS + 480, "the soak's own bound"):
        try:
            soak.start()
            rep = soak.run()
        finally:
            soak.close()
    print(soak.markdown(rep))
    injected = {f["fault"] for f in rep.faults if not f["detail"].startswith("not injected")}
    assert injected == {"replica-kill", "app-crash", "master-failover", "link-cut", "receiver-down"}, rep.faults
    assert any(k.endswith("→0") for k in rep.scale_events), f"no function went to zero: {rep.scale_events}"
    assert not rep.problems(), "\n".join(rep.problems()) + "\n" + soak.markdown(rep) + f"\nlogs: {tmp_path}"
