"""The test matrix: the in-memory suite on each supported Python x Django combination.

    .venv/bin/nox -s memory                       every combination below
    .venv/bin/nox -s "memory(py3.13-django6.1)"   one of them
    make matrix                                   what CI runs (CI_COMBINATIONS)
    .venv/bin/nox -s wheel                        build, check and install the wheel (make test-wheel)

Interpreters are found on this machine, never downloaded: ``python3.X`` on ``PATH`` (a
pyenv shim counts only if it really runs 3.X), then ``~/.pyenv/versions/3.X*/bin``,
``/usr/local/bin`` and ``/usr/bin``. A combination whose interpreter is missing is
skipped with a line saying so, not failed. Each combination gets its own virtualenv in
``.nox/``, reused while ``setup.cfg`` and the Django series stay the same.
"""

from __future__ import annotations

import configparser
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent

#: Every tested combination (Django 6 needs Python ≥ 3.12). The README's install section lists these.
COMBINATIONS = [
    ("3.11", "5.2"),
    ("3.12", "5.2"),
    ("3.12", "6.0"),
    ("3.12", "6.1"),
    ("3.13", "5.2"),
    ("3.13", "6.0"),
    ("3.13", "6.1"),
]
#: The extra leg of every `make test` (the default one, the project venv, runs the full suite);
#: `make matrix-all` runs every combination.
CI_COMBINATIONS = [("3.13", "6.1")]

#: uv in the project's venv (``make`` installs it), or ``None``: then pip builds the venvs.
UV = shutil.which("uv", path=str(Path(sys.executable).parent))
#: Tools of the ``test`` extra that the in-memory suite does not need.
NOT_FOR_THE_SUITE = {"playwright", "ruff", "mypy", "nox", "build", "twine", "sphinx", "furo", "myst-parser"}

nox.options.sessions = ["memory"]
nox.options.error_on_missing_interpreters = False


def _runs_as(candidate: str, version: str) -> bool:
    try:
        done = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and done.stdout.strip() == version


def _candidates(version: str) -> list[str]:
    found = [shutil.which(f"python{version}")]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    # Newest patch release first: 3.12.10 before 3.12.9.
    pyenv = sorted(
        glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}") + glob.glob(
            f"{pyenv_root}/versions/{version}/bin/python{version}"),
        key=lambda path: [int(n) for n in re.findall(r"\d+", path.split("/versions/")[1].split("/")[0])],
        reverse=True,
    )  # fmt: skip
    found += [*pyenv, f"/usr/local/bin/python{version}", f"/usr/bin/python{version}"]
    return [path for path in dict.fromkeys(found) if path and os.path.exists(path)]


def find_python(version: str) -> str | None:
    """A working ``python3.X`` on this machine, or ``None``."""
    return next((path for path in _candidates(version) if _runs_as(path, version)), None)


def suite_requirements() -> list[str]:
    """The ``test`` extra of setup.cfg without the tools, so the bounds live in one place."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in config["options.extras_require"]["test"].splitlines() if line.strip()]
    return [line for line in lines if re.split(r"[\[<>=!~ ]", line, maxsplit=1)[0] not in NOT_FOR_THE_SUITE]


def _venv(session: nox.Session, python: str, interpreter: str, django: str) -> Path:
    """The combination's virtualenv, created or refreshed when its requirements changed."""
    where = ROOT / ".nox" / f"memory-py{python}-django{django}"
    requirements = ["-e", ".", *suite_requirements(), f"Django=={django}.*"]
    stamp = hashlib.sha256("\n".join([interpreter, *requirements]).encode()).hexdigest()
    if (where / ".stamp").exists() and (where / ".stamp").read_text() == stamp:
        return where
    if where.exists():
        shutil.rmtree(where)
    new_venv(session, interpreter, where, requirements)
    (where / ".stamp").write_text(stamp)
    return where


def new_venv(session: nox.Session, interpreter: str, where: Path, requirements: list[str]) -> None:
    """A virtualenv at ``where`` with ``requirements``: with uv when the project's venv has it
    (``make`` installs it there), else with pip. Byte-compiled either way: where
    ``PYTHONDONTWRITEBYTECODE`` is set, every process would otherwise compile what it imports."""
    if UV:
        session.run(UV, "venv", "-q", "--allow-existing", "--python", interpreter, str(where), external=True)
        session.run(UV, "pip", "install", "-q", "--python", str(where / "bin" / "python"), "--compile-bytecode",
                    *requirements, external=True)  # fmt: skip
        return
    session.run(interpreter, "-m", "venv", str(where), external=True)
    pip = str(where / "bin" / "pip")
    session.run(pip, "install", "-q", "--upgrade", "pip", external=True)
    session.run(pip, "install", "-q", *requirements, external=True)


def _ids(combinations):
    return [f"py{python}-django{django}" for python, django in combinations]


def _run_suite(session: nox.Session, python: str, django: str) -> None:
    interpreter = find_python(python)
    if interpreter is None:
        session.skip(
            f"Python {python} is not installed on this machine (looked for python{python} on PATH, "
            f"in ~/.pyenv/versions/{python}.*/bin, /usr/local/bin and /usr/bin); Django {django} on it is not tested"
        )
    where = _venv(session, python, interpreter, django)
    python_bin = str(where / "bin" / "python")
    session.run(python_bin, "-c", "import sys, django; print('Python', sys.version.split()[0], '+ Django', "
                "django.get_version())", external=True)  # fmt: skip
    # Two workers: the suite mostly waits (timeouts, heartbeats, the quick start's subprocesses).
    session.run(
        python_bin, "-m", "pytest", "-m", "not faults and not browser and not abuse", "-q", "-p", "no:cacheprovider",
        "-n", "2", *session.posargs, external=True, env={"CR_TEST_STACK": "memory"},
    )  # fmt: skip


@nox.session(python=False)
@nox.parametrize(("python", "django"), COMBINATIONS, ids=_ids(COMBINATIONS))
def memory(session: nox.Session, python: str, django: str) -> None:
    """The in-memory suite (SQLite + in-memory layer) on one Python x Django combination."""
    _run_suite(session, python, django)


@nox.session(python=False)
@nox.parametrize(("python", "django"), CI_COMBINATIONS, ids=_ids(CI_COMBINATIONS))
def ci(session: nox.Session, python: str, django: str) -> None:
    """The extra leg of `make test`: the newest combination."""
    _run_suite(session, python, django)


#: What a user's installation needs from the wheel, beyond the Python modules.
WHEEL_MUST_HOLD = [
    "channel_registry/py.typed",
    "channel_registry/static/channel_registry/client.js",
    "channel_registry/migrations/0001_initial.py",
    "channel_registry/migrations/0003_userchannel_transport.py",
    "channel_registry/templates/admin/channel_registry/userchannel/online.html",
    "channel_registry/management/commands/prune_channels.py",
]


@nox.session(python=False)
def wheel(session: nox.Session) -> None:
    """Build the sdist and the wheel, ``twine check`` them, install the wheel into a new venv
    (newest Python with the newest Django) and follow the README's quick start against it."""
    dist = Path(tempfile.mkdtemp(prefix="cr-dist-"))
    # The wheel is built from the sdist, so a file missing from the sdist is missing here too.
    installer = ["--installer", "uv"] if UV else []
    session.run(sys.executable, "-m", "build", *installer, "--outdir", str(dist), str(ROOT), external=True, silent=True)
    [sdist] = dist.glob("*.tar.gz")
    [built] = dist.glob("*.whl")
    session.run(sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(built), external=True)
    names = set(zipfile.ZipFile(built).namelist())
    missing = [name for name in WHEEL_MUST_HOLD if name not in names]
    strays = sorted({name.split("/")[0] for name in names} - {"channel_registry"} - {
        name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")})  # fmt: skip
    if missing or strays:
        session.error(f"wheel {built.name}: missing {missing}, unexpected top-level entries {strays}")
    session.log(f"{built.name}: {len(names)} files, static files, migrations and py.typed included")

    interpreter, django = next(
        ((found, django) for version, django in [("3.13", "6.1"), ("3.12", "6.1")] if (found := find_python(version))),
        (sys.executable, "5.2"),
    )
    if django == "5.2":
        session.log(f"no Python 3.12/3.13 found: the wheel is installed with {interpreter} and Django 5.2")
    where = Path(tempfile.mkdtemp(prefix="cr-wheel-venv-"))
    # As the README's quick start says, plus the test runner.
    new_venv(session, interpreter, where, [f"{built}[redis,postgres]", "daphne", f"Django=={django}.*", "pytest"])
    python = str(where / "bin" / "python")

    # The quick start test and the README it reads, away from the source tree: the package
    # can only be imported from the venv's site-packages.
    project = Path(tempfile.mkdtemp(prefix="cr-wheel-quickstart-"))
    (project / "tests").mkdir()
    shutil.copy(ROOT / "README.md", project / "README.md")
    shutil.copy(ROOT / "tests" / "test_quickstart.py", project / "tests" / "test_quickstart.py")
    (project / "pytest.ini").write_text("[pytest]\n")
    with session.chdir(project):
        installed = session.run(
            python, "-c", "import channel_registry, django, pathlib, sys; "
            "p = pathlib.Path(channel_registry.__file__).parent; "
            "print(p, 'py.typed' if (p / 'py.typed').exists() else 'NO py.typed', sys.version.split()[0], "
            "django.get_version())",
            external=True, silent=True,
        )  # fmt: skip
        session.log(f"installed: {installed.strip()}")
        if "site-packages" not in installed or "NO py.typed" in installed:
            session.error("channel_registry was not imported from the wheel's installation, or py.typed is missing")
        session.run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", "pytest.ini",
                    "tests/test_quickstart.py", external=True, env={"PYTHONPATH": ""})  # fmt: skip
    for path in (dist, where, project):
        shutil.rmtree(path, ignore_errors=True)
