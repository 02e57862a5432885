"""The package root is the public API: complete, sorted, and documented."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import resilient_db


def test_all_is_sorted() -> None:
    assert resilient_db.__all__ == sorted(resilient_db.__all__)


def test_all_lists_every_public_name_of_the_root() -> None:
    public = {
        name
        for name, value in vars(resilient_db).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public | {"__version__"} == set(resilient_db.__all__)


def test_every_public_class_and_function_of_the_private_modules_is_exported() -> None:
    exported = set(resilient_db.__all__)
    missing: list[str] = []
    for info in pkgutil.walk_packages(resilient_db.__path__, "resilient_db."):
        if ".chaos" in info.name or info.name.endswith("testing"):
            continue  # the harness and the testing helpers have namespaces of their own
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            value = getattr(module, name)
            if getattr(value, "__module__", info.name).startswith("resilient_db") and not (
                name.startswith("_") or name in exported or inspect.ismodule(value)
            ):
                missing.append(f"{info.name}.{name}")
    internal = {
        "resilient_db._abort.abort_connection",
        "resilient_db._abort.abort_driver_connection",
        "resilient_db._abort.pending_cancel_requests",
        "resilient_db.policies.timeout.ABORT_GRACE",
        "resilient_db.policies.timeout.AttemptTimer",
        "resilient_db.policies.timeout.ConnectionTimer",
        "resilient_db._classify.resolve",
        "resilient_db._config.policy_from_env",
        "resilient_db._config.policy_from_mapping",
        "resilient_db._config.policy_from_toml",
        "resilient_db._scope.AttemptState",
        "resilient_db._scope.CallScope",
        "resilient_db._scope.CommitRecord",
        "resilient_db._scope.CommitStatus",
        "resilient_db._scope.current_scope",
        "resilient_db._doctables.sqlite_table",
        "resilient_db._doctables.sqlstate_table",
        "resilient_db._sqla.XID_READER",
        "resilient_db._sqla.inner_method",
        "resilient_db._sqla.install_commit_tracking",
        "resilient_db._sqla.replace_inner_method",
        "resilient_db._sqla.track_dialect",
        "resilient_db._sqla.uninstall_commit_tracking",
        "resilient_db.policies.retry.RetryPolicy",
        "resilient_db.policies.retry.is_testing",
        "resilient_db.policies.retry.set_testing",
        "resilient_db.policies.timeout.TimeoutPolicy",
    }
    assert sorted(set(missing) - internal) == []


def test_every_exported_name_has_a_docstring() -> None:
    objects = {name: getattr(resilient_db, name) for name in resilient_db.__all__}
    undocumented = [
        name
        for name, value in objects.items()
        if (inspect.isclass(value) or inspect.isfunction(value)) and not inspect.getdoc(value)
    ]
    assert undocumented == []


def test_every_public_error_derives_from_resilience_error() -> None:
    errors = [
        getattr(resilient_db, n)
        for n in resilient_db.__all__
        if inspect.isclass(getattr(resilient_db, n))
        and issubclass(getattr(resilient_db, n), BaseException)
    ]
    assert errors and all(issubclass(e, resilient_db.ResilienceError) for e in errors)
