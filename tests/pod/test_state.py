"""Durable pod state: records, intents in order, the creating lease and claims."""

from __future__ import annotations

import pytest

from magikrun.errors import PodExists, PodNotFound
from magikrun.platform import Paths
from magikrun.pod import PodSpec, find_pod
from magikrun.pod._state import PodStore

MANIFEST = b"""
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: team}
spec:
  containers: [{name: c, image: 'magikrun.local/busybox:demo'}]
"""


def test_records_intents_and_lease(paths: Paths) -> None:
    store = PodStore(paths)
    spec = PodSpec.from_yaml(MANIFEST)
    record = store.create(spec, "native")
    assert (record.id, record.state, record.runtime) == ("team_web", "creating", "native")
    assert record.owner_alive()
    assert record.spec == spec
    with pytest.raises(PodExists):
        store.create(spec, "native")
    first = store.intent(record.id, "netns", record.id, {"path": "/x"})
    second = store.intent(record.id, "container", "team_web_c", {"backend": "native"})
    store.done(first)
    assert [(r.seq, r.kind, r.done) for r in store.resources(record.id)] == [
        (1, "netns", True),
        (2, "container", False),
    ]
    store.forget(second)
    assert [r.kind for r in store.resources(record.id)] == ["netns"]
    store.update(record.id, state="ready", ip="10.0.0.2", info={"a": 1})
    again = PodStore(paths).get(record.id)
    assert (again.state, again.ip, again.info) == ("ready", "10.0.0.2", {"a": 1})
    assert find_pod(paths, "web", "team") == find_pod(paths, "team_web") == "team_web"
    assert store.claim(again, "failed")
    store.remove(record.id)
    assert store.resources(record.id) == []
    with pytest.raises(PodNotFound):
        find_pod(paths, "web", "team")
    with pytest.raises(PodNotFound):
        store.get(record.id)


def test_a_dead_owner_is_claimed_once(paths: Paths) -> None:
    store = PodStore(paths)
    record = store.create(PodSpec.from_yaml(MANIFEST), "native")
    with store.meta.transaction() as conn:
        conn.execute("UPDATE pods SET owner_pid = 999999999, owner_start = 1")
    stale = store.get(record.id)
    assert not stale.owner_alive()
    assert store.claim(stale, "failed")
    assert not store.claim(stale, "failed")
