"""Makini webhooks.

    signature   signing and checking Makini-style webhook signatures (standard library only)
    queue       the journal queue of received events and the worker that acts on them

Importing this package loads neither: the simulator takes ``signature`` alone, without the journal.
"""
