"""Builds the live objects (journal, backends, Makini clients, engine) from a configuration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import backends
from rotator.apart import refuse_shared_keys
from rotator.clock import SYSTEM, Clock
from rotator.crypto import KeyRing
from rotator.errors import ConfigError
from rotator.journal import Journal
from rotator.makini import MakiniClient
from rotator.rotation import discovery
from rotator.rotation.engine import RevokeResumer, RotationEngine
from rotator.rotation.environment import EnvironmentRuntime
from rotator.settings import Config


@dataclass
class Runtime:
    config: Config
    journal: Journal
    engine: RotationEngine
    environments: dict[str, EnvironmentRuntime] = field(default_factory=dict)
    credentials_changed: list[Callable[[str], None]] = field(default_factory=list)
    """Called with an environment's name once discovery changed its credentials (the API's
    list of served names follows)."""

    @classmethod
    def open(
        cls,
        config: Config,
        *,
        only: list[str] | None = None,
        clock: Clock = SYSTEM,
        resume_revoke: RevokeResumer | None = None,
    ) -> Runtime:
        """Build every environment (or ``only`` those). Raises ConfigError for missing secrets,
        keys or an unusable backend, naming which. ``resume_revoke``: how a drive finishes an
        unfinished emergency revoke it finds (``rotator.revoke.resume_held``)."""
        refuse_shared_keys(config)  # before anything is written or a key generated
        journal = Journal.open(config.journal, clock=clock)
        envs: dict[str, EnvironmentRuntime] = {}
        try:
            for name, env in config.environments.items():
                if only and name not in only:
                    continue
                built = [backends.build(b, name) for b in env.backend_settings]
                rt = EnvironmentRuntime(name=name, settings=env, backends=built)
                envs[name] = rt
                try:
                    rt.sealing_keys = KeyRing.load(env.sealing_key)
                    secret = env.makini.client_secret(
                        f"environments.{name}.makini.client_secret_env"
                    )
                except ConfigError as exc:
                    rt.missing = exc
                else:
                    rt.makini_client = MakiniClient(env.makini, secret, environment=name)
        except BaseException:
            for rt in envs.values():
                for b in rt.backends:
                    b.close()
            journal.close()
            raise
        engine = RotationEngine(
            journal,
            envs,
            concurrency=config.scheduler.concurrency,
            retry_after_failure=config.scheduler.retry_after_failure,
            clock=clock,
            resume_revoke=resume_revoke,
        )
        runtime = cls(config=config, journal=journal, engine=engine, environments=envs)
        try:
            for name in envs:  # the credentials discovery enrolled join the configured ones
                discovery.refresh(runtime, name)
        except BaseException:
            journal.close()
            raise
        return runtime

    async def aclose(self) -> None:
        await self.engine.aclose()  # first: it gives back any lease still held
        for rt in self.environments.values():
            if rt.makini_client is not None:
                await rt.makini_client.aclose()
            for b in rt.backends:
                b.close()
        self.journal.close()
