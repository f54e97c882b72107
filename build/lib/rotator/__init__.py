"""Makini token rotator: keeps Makini API tokens alive and safe.

The core lives here (settings, model, rotation engine, schedule, journal, Makini client and
simulator, HTTP API, CLI); secret backends are plugins in the sibling package ``backends``.
"""

__version__ = "0.1.0"
