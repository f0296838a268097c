"""An install that must have DeepSpeed and the browser stack (SMOE_LAB_REQUIRE, set by .ci/run) fails their tests
when they are missing instead of skipping them."""

import pytest
import required


def test_a_required_dependency_that_is_missing_fails(monkeypatch):
    monkeypatch.setenv(required.ENV, "deepspeed, browser")
    with pytest.raises(pytest.fail.Exception, match="requires 'deepspeed'"):
        required.need_module("no_such_module_xyz", "deepspeed")
    with pytest.raises(pytest.fail.Exception, match="requires 'browser'"):
        required.missing("browser", "no chromium binary")


def test_an_optional_dependency_that_is_missing_skips(monkeypatch):
    monkeypatch.delenv(required.ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="not importable"):
        required.need_module("no_such_module_xyz", "deepspeed")
    monkeypatch.setenv(required.ENV, "browser")
    with pytest.raises(pytest.skip.Exception):
        required.need_module("no_such_module_xyz", "deepspeed")
    assert required.need_module("json", "deepspeed").dumps([]) == "[]"
