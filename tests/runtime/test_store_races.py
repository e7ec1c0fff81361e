"""ContainerStore reads racing with another process that removes the container."""

from __future__ import annotations

import pytest

from magikrun.errors import ContainerNotFound
from magikrun.platform import Paths
from magikrun.runtime import ContainerStatus, ContainerStore


def test_refresh_of_a_container_removed_meanwhile_is_not_found(paths: Paths) -> None:
    store = ContainerStore(paths)
    record = store.reserve("gone-meanwhile", backend="native", bundle=paths.bundles / "x")
    record = store.update(record, status=ContainerStatus.RUNNING, pid=None)
    store.remove(record.id)  # what a supervisor restarting the container does
    with pytest.raises(ContainerNotFound, match="'gone-meanwhile' was removed"):
        store.refresh(record)
    assert not store.directory(record.id).exists()
    assert store.list() == []
