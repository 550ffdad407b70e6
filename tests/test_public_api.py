"""The public surface of ``audience_sync`` is its ``__all__``, and this test derives it from the
package rather than from a copied list: every name the package binds as its own is in
``__all__``, every name in ``__all__`` is the object its home module defines, every error is
exported with its exit code, and README's *Using it from Python* names exactly these."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import types

from conftest import REPO

import audience_sync
from audience_sync import errors

PUBLIC = set(audience_sync.__all__)


def own_names(namespace: dict[str, object]) -> set[str]:
    """Names without an underscore that ``namespace`` binds to classes or functions of
    audience_sync (so not submodules, nor ``TYPE_CHECKING``, ``importlib``... of the plumbing)."""
    return {
        name
        for name, value in namespace.items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and str(getattr(value, "__module__", "")).startswith("audience_sync")
    }


def in_fresh_interpreter(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def python_section() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n## Using it from Python\n")
    return readme[start : readme.index("\n## ", start + 1)]


def test_each_public_name_is_the_object_its_module_defines() -> None:
    assert len(PUBLIC) == len(audience_sync.__all__)
    for name in audience_sync.__all__:
        value = getattr(audience_sync, name)  # resolves the lazy ones
        assert not isinstance(value, types.ModuleType), name
        home = sys.modules[value.__module__]
        assert home.__name__.startswith("audience_sync."), name
        assert getattr(home, name) is value, f"{name} is not {home.__name__}.{name}"


def test_no_name_is_public_in_the_package_but_missing_from_all() -> None:
    for name in audience_sync.__all__:
        getattr(audience_sync, name)
    assert own_names(vars(audience_sync)) == PUBLIC
    # and what a fresh interpreter gets, before and after resolving the lazy names
    code = (
        "import audience_sync, types\n"
        "eager = {n for n, v in vars(audience_sync).items() if not n.startswith('_')"
        " and not isinstance(v, types.ModuleType)"
        " and str(getattr(v, '__module__', '')).startswith('audience_sync')}\n"
        "assert eager <= set(audience_sync.__all__), eager - set(audience_sync.__all__)\n"
        "namespace = {}\n"
        "exec('from audience_sync import *', namespace)\n"
        "assert set(namespace) - {'__builtins__'} == set(audience_sync.__all__)\n"
        "assert not [n for n, v in namespace.items() if isinstance(v, types.ModuleType)]\n"
    )
    in_fresh_interpreter(code)


def test_every_error_is_exported_with_its_exit_code() -> None:
    tree = {
        value
        for value in vars(errors).values()
        if inspect.isclass(value) and issubclass(value, errors.AudienceSyncError)
    }
    exported = {
        value
        for name in PUBLIC
        if inspect.isclass(value := getattr(audience_sync, name))
        and issubclass(value, BaseException)
    }
    assert exported == tree
    for error in tree:
        assert isinstance(error.exit_code, errors.ExitCode), error
        assert error.exit_code in errors.SEVERITY or error.exit_code is errors.ExitCode.USAGE


def test_the_readme_documents_exactly_the_public_names() -> None:
    section = python_section()
    named = set(re.findall(r"`([A-Za-z_]\w*)", section))
    assert not PUBLIC - named, f"not in README's Using it from Python: {sorted(PUBLIC - named)}"
    imported = {
        name.strip()
        for names in re.findall(r"^from audience_sync import (.+)$", section, re.MULTILINE)
        for name in names.split(",")
    }
    assert imported and imported <= PUBLIC


def test_lazy_names_are_the_functions_whatever_the_import_order() -> None:
    """``read_calls`` first imports ``audience_sync.track``, which Python binds on the package:
    ``track`` must still be the function, not that submodule."""
    code = (
        "from audience_sync import read_calls, track, CallFile\n"
        "import audience_sync\n"
        "assert callable(track) and track.__name__ == 'track', track\n"
        "assert audience_sync.track is track\n"
    )
    in_fresh_interpreter(code)
