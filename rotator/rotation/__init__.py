"""The rotation core: the engine's five steps and what they run on.

    runtime      builds the live objects (journal, backends, Makini clients, engine) from a config
    environment  one environment's live objects
    engine       the journaled state machine (issue, stage, verify, promote, retire)
    work         what the engine is asked (Work) and answers (RotationResult, Outcome)
    worker       the one seam for blocking calls (backends) and journal work
    sealing      token pairs sealed into journal rows
    events       promoted / revoked / result, for the layers above to subscribe to
    drops        revoked versions recorded for every serving replica
    queries      current version, Makini's verdict on it, each backend's current version
    importing    a token pair obtained outside the rotator made current
    schedule     what is due, from the config and the journal
    status       every credential's state, for `rotator status`
    repair       backend sync and probe
    unaccounted  tokens Makini may have issued that no backend holds
    workers      run-due across processes
"""
