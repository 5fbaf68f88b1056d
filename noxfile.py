"""Development sessions: ``nox`` runs what CI runs (lint, typecheck, tests, docs).

Sessions use the interpreter nox runs under (any Python 3.10+), each in a fresh virtualenv.
``nox -s demo`` and ``nox -s bench`` are on demand.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.needs_version = ">=2024.4"
nox.options.sessions = ["lint", "typecheck", "tests", "docs"]
nox.options.reuse_existing_virtualenvs = False

# Tools whose new releases add checks are pinned, so CI turns red only on our changes.
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"


@nox.session
def lint(session: nox.Session) -> None:
    """Lint and check formatting with ruff (``ruff format .`` fixes the latter)."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the package and the tests with mypy (strict, see pyproject.toml)."""
    session.install(".[test]", MYPY)
    session.run("mypy")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite under coverage; fails below ``fail_under`` in pyproject.toml."""
    session.install(".[test]")
    session.run("coverage", "erase")
    # One pytest worker per core; coverage follows them (``patch = ["subprocess"]``).
    session.run("coverage", "run", "-m", "pytest", "-n", "auto", *session.posargs)
    session.run("coverage", "combine")
    session.run("coverage", "report")


@nox.session
def tests_lowest(session: nox.Session) -> None:
    """The test suite against the lowest dependency versions pyproject.toml allows."""
    session.install(
        ".[test]",
        "anyio==4.4.0",
        "attrs==23.2.0",
        "cattrs==23.2.1",
        "httpx==0.27.0",
        "redis==5.0.1",
    )
    session.run("pytest", *session.posargs)


@nox.session(python=["3.10", "3.11", "3.12", "3.13"])
def tests_all(session: nox.Session) -> None:
    """The test suite on every supported Python found on this machine (not run by CI)."""
    tests(session)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation; any warning (a broken link or reference) fails."""
    session.install(".[docs]", RUFF)  # mkdocstrings formats signatures with ruff
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def demo(session: nox.Session) -> None:
    """Run the demo on the built-in emulator (no API key, no network)."""
    session.install(".")
    session.run("python", "-m", "keevx_async", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Run every ``bench/*.py`` script, passing ``session.posargs`` to each."""
    scripts = sorted(p for p in Path("bench").glob("*.py") if not p.name.startswith("_"))
    if not scripts:
        session.log("no benchmarks yet: bench/ has no *.py scripts")
        return
    session.install(".[bench]")
    for script in scripts:
        session.run("python", str(script), *session.posargs)
