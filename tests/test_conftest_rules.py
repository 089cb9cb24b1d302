"""The conftest rule: a test that uses the real model without ``@pytest.mark.slow`` stops the run
at collection, with a message naming the test."""

from types import SimpleNamespace

import pytest

from tests.conftest import unmarked_real_model_tests


def _item(nodeid, fixtures, slow):
    return SimpleNamespace(
        nodeid=nodeid,
        fixturenames=list(fixtures),
        get_closest_marker=lambda name: object() if (slow and name == "slow") else None,
    )


def test_check_names_only_unmarked_real_model_tests():
    items = [
        _item("t.py::direct", ["smollm2", "tmp_path"], slow=False),
        _item("t.py::through_a_fixture", ["known", "smollm2"], slow=False),  # fixturenames is the closure
        _item("t.py::marked", ["smollm2"], slow=True),
        _item("t.py::tiny", ["tmp_path", "data_path"], slow=False),
    ]
    assert unmarked_real_model_tests(items) == ["t.py::direct", "t.py::through_a_fixture"]
    assert unmarked_real_model_tests(items[2:]) == []


_CONFTEST = """
import pytest
from tests.conftest import pytest_collection_modifyitems  # the rule under test

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real model")

@pytest.fixture(scope="session")
def smollm2():
    return "a stand-in for the real model"

@pytest.fixture
def known(smollm2):
    return [smollm2]
"""


def test_unmarked_real_model_test_fails_collection(pytester):
    pytester.makeconftest(_CONFTEST)
    pytester.makepyfile(
        test_real="""
        import pytest

        @pytest.mark.slow
        def test_marked(smollm2):
            pass

        def test_forgot_the_marker(known):
            pass

        def test_tiny():
            pass
    """
    )
    result = pytester.runpytest("-m", "not slow")  # the rule holds whatever is selected
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "not marked @pytest.mark.slow" in err and "test_real.py::test_forgot_the_marker" in err
    assert "test_marked" not in err and "test_tiny" not in err


def test_marked_real_model_test_is_collected_and_deselected(pytester):
    pytester.makeconftest(_CONFTEST)
    pytester.makepyfile(
        test_real="""
        import pytest

        @pytest.mark.slow
        def test_marked(smollm2):
            pass

        def test_tiny():
            pass
    """
    )
    result = pytester.runpytest("-m", "not slow")
    result.assert_outcomes(passed=1, deselected=1)
