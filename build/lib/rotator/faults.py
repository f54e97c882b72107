"""Crash points for fault tests.

``ROTATOR_FAULT_KILL_AFTER=<step>[:<credential>]`` makes the process SIGKILL itself right after
the journal records ``step`` (optionally only for one credential): the crash tests use it to
show that every step resumes. Unset (always, in production) it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "ROTATOR_FAULT_KILL_AFTER"


def checkpoint(step: str, credential: str) -> None:
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    want_step, _, want_cred = spec.partition(":")
    if want_step == step and (not want_cred or want_cred == credential):
        os.kill(os.getpid(), signal.SIGKILL)
