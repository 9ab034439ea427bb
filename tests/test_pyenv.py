"""`--python-env` on the desktop: an environment built once per lockfile with uv (the
wheel Chiffon depends on), found in the cache the next time, and a failed build said in
uv's words. Offline: the locks name no package the index would have to serve."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest

from chiffon.agent.pyenv import EnvFailed, ensure, uv_binary

PROJECT = '[project]\nname = "x"\nversion = "0"\nrequires-python = ">=3.8"\ndependencies = []\n'


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UV_OFFLINE", "1")
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))


def _python_of(env: Path) -> str:
    done = subprocess.run([env / "bin" / "python", "-c", "import sys; print(sys.prefix)"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout.strip()


def test_a_requirements_file_is_built_once_and_found_in_the_cache_after(tmp_path: Path) -> None:
    folder, envs = tmp_path / "job", tmp_path / "envs"
    folder.mkdir()
    (folder / "requirements.txt").write_text("# nothing to install\n")
    first = asyncio.run(ensure(folder, envs))
    assert first.built_seconds is not None and first.source == "requirements.txt"
    assert _python_of(first.path) == str(first.path)
    again = asyncio.run(ensure(folder, envs))
    assert (again.path, again.built_seconds) == (first.path, None)
    assert again.line().startswith(f"chiffon: python environment {first.key[:12]} from "
                                   "requirements.txt (from the cache)")  # fmt: skip
    (folder / "requirements.txt").write_text("# changed\n")
    assert asyncio.run(ensure(folder, envs)).key != first.key  # a new lock, a new env


def test_a_uv_lock_is_synced_without_installing_the_project(tmp_path: Path) -> None:
    folder, envs = tmp_path / "job", tmp_path / "envs"
    folder.mkdir()
    (folder / "pyproject.toml").write_text(PROJECT)
    subprocess.run([uv_binary(), "lock"], cwd=folder, check=True, capture_output=True)
    (folder / "requirements.txt").write_text("ignored: the lock wins\n")
    env = asyncio.run(ensure(folder, envs))
    assert env.source == "uv.lock" and _python_of(env.path) == str(env.path)
    assert not list(env.path.glob("lib/python*/site-packages/x*"))  # the job's code: not in


def test_a_failed_build_says_why_and_leaves_nothing_half_built(tmp_path: Path) -> None:
    folder, envs = tmp_path / "job", tmp_path / "envs"
    folder.mkdir()
    (folder / "requirements.txt").write_text("no-such-package-chiffon==1.0\n")
    with pytest.raises(EnvFailed, match="building the python environment failed"):
        asyncio.run(ensure(folder, envs))
    assert [p for p in envs.iterdir() if p.is_dir()] == []
    (folder / "requirements.txt").unlink()
    with pytest.raises(EnvFailed, match=r"has no uv\.lock"):
        asyncio.run(ensure(folder, envs))


BACKEND = """
import pathlib
def _mark(*_a, **_k):
    pathlib.Path(MARK).write_text("ran")
    raise SystemExit("built")
build_wheel = build_editable = _mark
get_requires_for_build_wheel = prepare_metadata_for_build_wheel = _mark
"""


def test_a_lock_that_needs_a_build_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    # A source tree with its own build backend (PEP 517, no download needed): building it
    # would run the job's code outside its sandbox, as the agent's user.
    folder, envs = tmp_path / "job", tmp_path / "envs"
    pkg = folder / "evil"
    pkg.mkdir(parents=True)
    (pkg / "pyproject.toml").write_text('[project]\nname = "evil"\nversion = "1"\n[build-system]\n'
                                        'requires = []\nbuild-backend = "backend"\n'
                                        'backend-path = ["."]\n')  # fmt: skip
    mark = tmp_path / "BUILT-BY-THE-AGENT"
    (pkg / "backend.py").write_text(f"MARK = {str(mark)!r}\n" + BACKEND)
    (folder / "requirements.txt").write_text("./evil\n")
    with pytest.raises(EnvFailed, match="building the python environment failed"):
        asyncio.run(ensure(folder, envs))
    assert not mark.exists()


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("-r /etc/shadow", "/etc/shadow leads outside the job's folder"),
        ("--index-url https://mirror.example.org/${CHIFFON_AMQP_URL}/", "names a variable"),
        ("--requirement=../../secrets.txt", "outside the job's folder"),
        ("evil @ file:///root/.ssh/id_rsa", "outside the job's folder"),
        ("-e .", "-e is not allowed"),
        ("--index-url /srv/mirror", "--index-url is not allowed"),
    ],
)
def test_a_requirements_file_cannot_name_the_desktops_files(
    tmp_path: Path, line: str, says: str
) -> None:
    # uv runs as the agent's user and its words go back to the job's owner: `-r /etc/shadow`
    # would print the file's first line in the error.
    folder, envs = tmp_path / "job", tmp_path / "envs"
    folder.mkdir()
    (folder / "requirements.txt").write_text(f"numpy\n{line}\n")
    with pytest.raises(EnvFailed, match=re.escape(says)):
        asyncio.run(ensure(folder, envs))
    assert not envs.exists() or not any(envs.iterdir())


def test_index_urls_and_the_folders_own_requirement_files_are_allowed(tmp_path: Path) -> None:
    folder, envs = tmp_path / "job", tmp_path / "envs"
    folder.mkdir()
    (folder / "base.txt").write_text("# nothing\n")
    (folder / "requirements.txt").write_text(
        "--extra-index-url https://wheels.example.org/simple\n-r base.txt\n--pre\n"
    )
    env = asyncio.run(ensure(folder, envs))
    assert env.source == "requirements.txt" and env.built_seconds is not None


def test_a_lock_file_that_is_a_link_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    folder, envs = tmp_path / "job", tmp_path / "envs"
    folder.mkdir()
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$salt$HASH:19000:0:99999:7:::\n")
    (folder / "pyproject.toml").write_text(PROJECT)
    (folder / "uv.lock").symlink_to(secret)
    with pytest.raises(EnvFailed, match=r"uv\.lock leads outside the job.s folder") as refused:
        asyncio.run(ensure(folder, envs))
    assert "HASH" not in str(refused.value)
