"""The engine fixture the unit tests share (not a conftest.py: integration tests import `conftest` by name)."""
import asyncio

import pytest

from netweft.daemon.engine import Engine
from netweft.dataplane.fake import FakeDataPlane
from netweft.ipam.address import parse_pool


@pytest.fixture
def engine(tmp_path):
    """An engine on the fake data plane, with a /16 default pool."""
    eng = Engine(str(tmp_path / "data"), str(tmp_path / "run"), [parse_pool("base=198.18.0.0/16,size=24")],
                 FakeDataPlane())
    yield eng
    asyncio.run(eng.close())
