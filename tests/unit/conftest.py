"""Unit-tier fixtures."""

from __future__ import annotations

import pytest

from tests.builders import job_dict
from tests.unit.fake_kube import FakeKube


@pytest.fixture
def kube() -> FakeKube:
    k = FakeKube()
    body = job_dict()
    body["metadata"]["generation"] = 1
    k.put(body)
    return k
