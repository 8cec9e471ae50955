"""The suite's tiers (tests/conftest.py), run on a small suite of their own: the fixtures that start
moto or Ray mark the tests that use them, so `make test-fast` (-m "not ray and not s3") leaves them
out, and a test that starts Ray without the `ray` marker fails."""

from __future__ import annotations

import pytest

CONFTEST = """
import pytest

from tests.conftest import _ray_only_when_marked, pytest_collection_modifyitems  # the hooks under test


@pytest.fixture(scope="session")
def s3_endpoint():
    return "http://127.0.0.1:1"  # stands in for moto: only the name matters to the hook


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    return None


@pytest.fixture()
def s3fs_client(s3_endpoint):
    return None
"""

INI = "[pytest]\naddopts = --strict-markers -p no:cacheprovider\nmarkers =\n  ray: r\n  s3: s\n  slow: s\n"


@pytest.fixture()
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    return pytester


TIERS = """
import pytest

def test_plain():
    pass

def test_through_a_fixture_on_s3(s3fs_client):
    pass

def test_on_ray(ray_local):
    pass

@pytest.mark.ray
def test_marked_by_hand():
    pass
"""


def test_fixtures_mark_their_tests_and_the_fast_tier_leaves_them_out(suite):
    suite.makepyfile(test_tiers=TIERS)
    suite.runpytest("-m", "not ray and not s3").assert_outcomes(passed=1, deselected=3)
    suite.runpytest("-m", "s3").assert_outcomes(passed=2, deselected=2)  # ray_local stands on moto too
    suite.runpytest("-m", "ray").assert_outcomes(passed=2, deselected=2)
    assert suite.runpytest("-m", "not ray and not s3", "-k", "on_ray").ret == pytest.ExitCode.NO_TESTS_COLLECTED


# A stand-in `ray` module (pytester restores sys.modules after the run): "starting" it is what
# ray.init does to ray.is_initialized().
STARTS = """
import sys
import types

import pytest

ray = types.ModuleType("ray")
ray.up = False
ray.is_initialized = lambda: ray.up
ray.shutdown = lambda: setattr(ray, "up", False)
sys.modules["ray"] = ray

def test_unmarked():
    ray.up = True

@pytest.mark.ray
def test_marked():
    ray.up = True
    ray.shutdown()  # as ray_local does at the end of a run
"""


def test_a_test_that_starts_ray_unmarked_fails(suite):
    suite.makepyfile(test_starts=STARTS)
    result = suite.runpytest()
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*test_starts.py::test_unmarked started Ray: mark it `@pytest.mark.ray`*"])
