"""SIGKILL at every point of the retire and of the emergency revoke, in both Makini modes, then
resume: the end state is an uninterrupted run's.

One credential per crash point (and one run without a crash, the control), so that one
configuration and one resume cover a whole mode: the kills run one after the other, each in
its own ``rotator`` process, then the resumes (``run-due`` for a retire; ``revoke --resume``
and ``run-due`` for a revoke, each resuming half of the points, the halves swapped between the
modes) and one look at the end state of every credential.

Which points a run passes depends on the mode (``rotator/faults.py`` lists them all):

* the retire passes ``retiring`` and ``retire-revoked`` only where it revokes the old pair at
  Makini (mode B); where Makini killed the old token at issue (mode A) it only makes the old
  version unreadable;
* the revoke's kill (mode A: an issue, sealed as ``revoke-issued``; mode B: the revocation path,
  then an issue for the replacement, sealed as ``revoke-killed``) is recorded with the next
  step where the probe says the old token is dead, so ``revoke-killed`` is passed in mode B
  only; ``revoke-purged`` is recorded only when the confirmation cannot reach Makini, so it is
  reached by a resume during an outage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rotator.makini.sim import SimServer
from rotator.model import StoredVersion
from tests.e2e.rig import MODES, Mode, Rig, fingerprints, values
from tests.wait import lease_free, wait_until

pytestmark = pytest.mark.e2e

RETIRE_POINTS: dict[str, tuple[str, ...]] = {
    "A": ("retire-unreadable", "done"),
    "B": ("retiring", "retire-unreadable", "retire-revoked", "done"),
}
REVOKE_POINTS: dict[str, tuple[str, ...]] = {
    "A": (
        "revoke-issued",
        "revoke-kill-effect",
        "revoke-install-effect",
        "revoke-replaced",
        "revoke-purge-effect",
        "revoke-purged",
        "revoke-done",
    ),
    "B": (
        "revoke-kill-effect",
        "revoke-killed",
        "revoke-install-effect",
        "revoke-replaced",
        "revoke-purge-effect",
        "revoke-purged",
        "revoke-done",
    ),
}


def _key(mode: Mode) -> str:
    return mode.name[0]


def end_state(rig: Rig, name: str, before: StoredVersion, status: dict[str, Any]) -> dict[str, Any]:
    """What must hold for ``name`` after its token ``before`` was rotated away or revoked:
    each entry is True in an uninterrupted run (the problems list is empty)."""
    current = rig.currents(name)
    first = current[0]
    ids = {v.version_id if v else None for v in current}
    view = rig.sim.token(first.tokens.access.fingerprint) if first else None
    problems = [
        f"{key}={status[key]!r}"
        for key in ("attention", "open_step", "open_revoke", "stalled_lease")
        if status[key] is not None
    ]
    if status["unaccounted"]:
        problems.append(f"unaccounted={status['unaccounted']}")
    if not status["backends_agree"]:
        problems.append("backends differ")
    return {
        "every backend holds the same current version": len(ids) == 1 and None not in ids,
        "the current version is new": first is not None and first.version_id != before.version_id,
        "status names it": first is not None and status["current_version"] == first.version_id,
        "the old version is readable nowhere": rig.readable(name, before.version_id) == [],
        "the old pair is dead at Makini": all(
            rig.status_at_makini(t) != "active" for t in values(before)
        ),
        "the current token works, for its connection": view is not None
        and view["status"] == "active"
        and view["connection_id"] == rig.connection(name),
        "Makini accepts the current pair and nothing else": first is not None
        and rig.live(name) == fingerprints(first),
        "status problems": problems,
    }


GOOD = {
    "every backend holds the same current version": True,
    "the current version is new": True,
    "status names it": True,
    "the old version is readable nowhere": True,
    "the old pair is dead at Makini": True,
    "the current token works, for its connection": True,
    "Makini accepts the current pair and nothing else": True,
    "status problems": [],
}


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_sigkill_at_every_point_of_retire_and_revoke_then_resume(
    tmp_path: Path, sim: SimServer, mode: Mode
) -> None:
    retire = {p: "r-" + p.removeprefix("retire-") for p in RETIRE_POINTS[_key(mode)]}
    revoke = {p: "v-" + p.removeprefix("revoke-") for p in REVOKE_POINTS[_key(mode)]}
    controls = ["r-none", "v-none"]
    names = [*retire.values(), *revoke.values(), *controls]
    rig = Rig(tmp_path, sim, mode, names)
    rig.ok("rotate", "prod", *names)
    before = {n: rig.current(n) for n in names}

    # revoke-purged is recorded only when the confirmation cannot reach Makini: the revoke is
    # killed right after its purge, and its resume, during an outage, is killed there (once
    # the first kill's lease has expired: meanwhile the other points are killed)
    purged = revoke["revoke-purged"]
    why = ("--reason", "crash at revoke-purged", "--yes")
    rig.killed("revoke-purge-effect", purged, "revoke", "prod", purged, *why)
    journal = f"sqlite:///{rig.dir / 'journal.db'}"
    # the retire (a rotation: with a grace period of 0 s it retires the old version at once)
    # and the emergency revoke, each killed at its point, one after the other (at once, their
    # heartbeats starve on a busy machine and a lease of 1 s expires under a live worker)
    for point, name in retire.items():
        rig.killed(point, name, "rotate", "prod", name)
    rig.ok("rotate", "prod", "r-none")
    wait_until(
        "the first killed revoke's lease to expire", lambda: lease_free(journal, f"prod/{purged}")
    )
    sim.set(outage_s=60)
    rig.killed("revoke-purged", purged, "revoke", "prod", purged, "--resume", "--json")
    sim.set(outage_s=0)
    for point, name in revoke.items():
        if point != "revoke-purged":
            why = ("--reason", f"crash at {point}", "--yes")
            rig.killed(point, name, "revoke", "prod", name, *why)
    rig.ok("revoke", "prod", "v-none", "--reason", "no crash", "--yes")
    leases = [f"prod/{n}" for n in revoke.values()]
    wait_until("the killed revokes' leases to expire", lambda: lease_free(journal, *leases))

    # the resumes: `revoke --resume` for half the revokes, run-due for everything else
    points = list(revoke)
    flip = 0 if mode.invalidates else 1
    by_resume = [revoke[p] for i, p in enumerate(points) if i % 2 == flip]
    proc = rig.ok("revoke", "prod", *by_resume, "--resume", "--json")
    outcomes = {r["credential"]: r["outcome"] for r in json.loads(proc.stdout)["results"]}
    # (a revoke killed after its last record was finished: nothing to resume)
    assert outcomes == {n: "skipped" if n == "v-done" else "revoked" for n in by_resume}
    proc = rig.ok("run-due", "--env", "prod", "--json")
    results = {r["credential"]: r["outcome"] for r in json.loads(proc.stdout)}
    resumed = {n for n in retire.values() if n != "r-done"} | set(revoke.values())
    assert results == {
        n: "revoked" if n.startswith("v-") else "retired"
        for n in resumed - set(by_resume) - {"v-done"}
    }

    # Where the process died with a request for a token recorded as sent, the rotator cannot
    # know whether Makini issued one: it reports it. Mode B's revoke records its kill with
    # the request for the replacement (one write), so a kill at revoke-killed is such a case.
    asked = [revoke["revoke-killed"]] if "revoke-killed" in revoke else []
    code, rows = rig.status()
    states = {n: end_state(rig, n, before[n], rows[n]) for n in names}
    wrong = {n: {k: v for k, v in s.items() if v != GOOD[k]} for n, s in states.items()}
    reported = {"status problems": ["unaccounted=1"]}
    assert wrong == {n: reported if n in asked else {} for n in names}
    assert set(GOOD) == set(states["r-none"])
    assert code == (3 if asked else 0)
    entries = rig.unaccounted(closed=True)
    audit = rig.audit()
    assert [(e["credential"], e["connection_id"], e["status"]) for e in entries] == [
        (n, rig.connection(n), "open") for n in asked
    ]
    if asked:
        assert "emergency revoke" in entries[0]["cause"]
        [audited] = [e for e in audit if e["action"] == "token.unaccounted"]
        assert audited["detail"]["unaccounted_id"] == entries[0]["id"]
        rig.ok("unaccounted", "ack", "prod", str(entries[0]["id"]), "--reason", "never sent")
        code, rows = rig.status()
        assert code == 0 and rows[asked[0]]["unaccounted"] == 0

    # each retire and each revoke happened once, as in an uninterrupted run
    for name in [*retire.values(), "r-none"]:
        mine = [
            e["detail"]["revoked_at_makini"]
            for e in audit
            if e["action"] == "rotation.retired" and e["version_id"] == before[name].version_id
        ]
        assert mine == [mode.revoke_path], name
    for name in [*revoke.values(), "v-none"]:
        done = [e for e in audit if e["action"] == "revoke.completed" and e["credential"] == name]
        assert [(e["outcome"], e["version_id"]) for e in done] == [
            ("revoked", before[name].version_id)
        ], name
        assert done[0]["detail"]["report"]["old_token_dead"] is True

    tokens = set().union(*(values(before[n]) | values(rig.current(n)) for n in names))
    rig.assert_no_token_leaked(tokens)
