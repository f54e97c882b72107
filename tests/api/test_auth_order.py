"""The key decides first (issue 14, item 9): on every operation that needs a key, taken from the
served OpenAPI document (so a route added later is walked too), a caller without a key or with a
wrong one gets 401, and a key of another environment 403, whatever the body, the query and the
path hold: nothing about the request is validated for a caller the key does not admit."""

from __future__ import annotations

import itertools
from typing import Any

from tests.api.conftest import Factory, LogTrap, bearer, make_keys

PUBLIC = {
    ("post", "/v1/webhooks/makini/{env}"),  # authenticated by its HMAC signature instead
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
}
"""The operations that need no key. Any other operation must declare the bearer key."""

BODIES: dict[str, bytes | None] = {
    "none": None,
    "valid": b'{"reason": "test", "credentials": ["alpha"]}',
    "not json": b"{'reason':",
    "wrong types": b'{"reason": 7, "credentials": "alpha", "unknown": true, "all": "yes"}',
    "a JSON array": b"[1, 2, 3]",
    "nested 2,000 deep": b'{"reason": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    "over the size limit": b'{"reason": "' + b"x" * 100_000 + b'"}',
}
BAD_QUERY = "?stage=bogus&wait=-1&known_version=%00%01&wait=99999999&stage=previous"
VARIANTS = [("", body) for body in BODIES.items()] + [
    (BAD_QUERY, ("none", None)),
    (BAD_QUERY, ("not json", BODIES["not json"])),
]
"""(query, body) sent to every path: a body matters to a POST, a query to a GET."""
NAMES = {"env": ("prod", "Not_An_Env!"), "name": ("alpha", "Bad Name!")}
"""Path values: valid, and malformed (the route's documented pattern refuses them). The keys
of another environment are tried against both."""


def operations(doc: dict[str, Any]) -> list[tuple[str, str]]:
    keyed, public = [], set()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if op.get("security"):
                assert op["security"] == [{"HTTPBearer": []}], (method, path)
                assert {"401", "403"} <= set(op["responses"]), (method, path)
                keyed.append((method, path))
            else:
                public.add((method, path))
    assert public == PUBLIC, "an operation without a key: declare the key or list it in PUBLIC"
    return keyed


def paths(template: str) -> list[str]:
    """``template`` with every combination of the values of its parameters."""
    params = [p.split("}")[0] for p in template.split("{")[1:]]
    out = []
    for values in itertools.product(*(NAMES.get(p, ("x",)) for p in params)):
        path = template
        for param, value in zip(params, values, strict=True):
            path = path.replace("{" + param + "}", value)
        out.append(path)
    return out


async def test_every_route_that_needs_a_key_decides_on_the_key_first(
    serve: Factory, log_trap: LogTrap
) -> None:
    api = await serve()
    keys = make_keys(api, log_trap)
    doc = (await api.http.get("/openapi.json")).json()
    keyed = operations(doc)
    assert len(keyed) >= 4
    live = keys.admin["prod"]
    strangers: dict[str, dict[str, str]] = {
        "no key": {},
        "an unknown key": bearer("mra_0123456789ab_" + "A" * 43),
        "a live key id with a wrong secret": bearer(live[:17] + "B" * 43),
        "a truncated key": bearer(live[:-1]),
        "a key of another scheme": {"Authorization": f"Basic {live}"},
        "a bare scheme": {"Authorization": "Bearer"},
    }
    # keys of another environment (dev): every kind of them
    foreign = {
        "dev reader": keys.reader["dev"],
        "dev admin": keys.admin["dev"],
        "dev alpha-only reader": keys.scoped[("dev", "alpha")],
    }
    checked = 0
    for (method, template), (query, (body_name, body)) in itertools.product(keyed, VARIANTS):
        for path in paths(template):
            url = path + query
            callers = [(who, auth, 401) for who, auth in strangers.items()]
            callers += [(who, bearer(key), 403) for who, key in foreign.items()]
            for who, auth, status in callers:
                r = await api.http.request(
                    method.upper(),
                    url,
                    content=body,
                    headers={"content-type": "application/json", **auth},
                )
                where = (method, url[:80], body_name, who)
                assert r.status_code == status, (*where, r.status_code, r.text[:200])
                error = r.json()["error"]
                assert error["code"] == ("unauthorized" if status == 401 else "forbidden"), where
                if status == 401:
                    assert r.headers["www-authenticate"] == "Bearer", where
                checked += 1
    assert checked >= len(keyed) * len(VARIANTS) * len(callers)
