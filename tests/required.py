"""Optional test dependencies that an install may be required to have.

`SMOE_LAB_REQUIRE=deepspeed,browser` (set by .ci/run, whose install has them) turns "skip, X is missing" into a
failure for those names: a CI run that claims to test DeepSpeed parity or the browser explorer cannot pass by
skipping them. Without the variable a missing optional dependency skips the test with its reason.
"""

import importlib
import os

import pytest

ENV = "SMOE_LAB_REQUIRE"


def required(name: str) -> bool:
    return name in {x.strip() for x in os.environ.get(ENV, "").split(",") if x.strip()}


def missing(name: str, reason: str) -> None:
    """Fail (name is required here) or skip (it is optional) a test that cannot run because of `reason`."""
    if required(name):
        pytest.fail(f"{reason}, but {ENV} requires {name!r} in this install", pytrace=False)
    pytest.skip(reason)


def need_module(module: str, name: str):
    """Import `module` (e.g. deepspeed.moe.sharded_moe) or fail/skip as `missing` decides."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(name, f"{module} is not importable ({e})")
