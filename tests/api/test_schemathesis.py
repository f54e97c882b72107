"""Schemathesis against the served ``/openapi.json``: generated valid and invalid requests for
every operation, with a reader key and with an admin key, find no server error and no answer
outside the documented statuses, content types and schemas.

The pytest plugin stays off (``-p no:schemathesis``: it costs a second at every pytest start);
this test uses schemathesis's Python API with Hypothesis directly.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.api.conftest import Factory, LogTrap, make_keys

MAX_EXAMPLES = 20


def fuzz(url: str, keys: dict[str, str]) -> dict[str, int]:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )
    from schemathesis.core.result import Err

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    runs: dict[str, int] = {}

    def runner(
        operation: Any, mode: Any, label: str, key: str, pinned: dict[str, str] | None = None
    ) -> Any:
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=pinned))
        def run(case: Any) -> None:
            runs[label] += 1
            case.call_and_validate(
                base_url=url, headers={"Authorization": f"Bearer {key}"}, checks=checks
            )

        return run

    names = {"env": "prod", "name": "alpha"}
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()
        # real names too, so that the success paths are fuzzed (not the revoke hook)
        pinned = {p: names[p] for p in names if "{" + p + "}" in operation.path}
        for who, key in keys.items():
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                label = f"{operation.label} {mode.value} {who}"
                runs[label] = 0
                try:
                    runner(operation, mode, label, key)()
                except Unsatisfiable:
                    if mode is GenerationMode.POSITIVE:
                        raise
                    runs[label] = -1  # nothing to make invalid (no parameters, no body)
            if pinned and "revoke" not in operation.path:
                label = f"{operation.label} pinned {who}"
                runs[label] = 0
                runner(operation, GenerationMode.POSITIVE, label, key, pinned)()
    return runs


async def test_schemathesis_finds_no_server_error(serve: Factory, log_trap: LogTrap) -> None:
    api = await serve(threaded=True)
    keys = make_keys(api, log_trap)
    admin = {"Authorization": f"Bearer {keys.admin['prod']}"}
    async with api.http as http:
        r = await http.post("/v1/admin/rotate/prod/alpha", headers=admin)
        assert r.status_code == 200, r.text
    runs = await asyncio.to_thread(
        fuzz, api.url, {"reader": keys.reader["prod"], "admin": keys.admin["prod"]}
    )
    assert len(runs) == 8 * 2 * 2 + 4 * 2 and all(runs.values()), runs
    negatives = [label for label, count in runs.items() if count > 0 and "negative" in label]
    assert len(negatives) >= 5 * 2, runs
