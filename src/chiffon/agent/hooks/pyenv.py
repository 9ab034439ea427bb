"""`--python-env`: once its files are laid in, the job's Python environment is found in
the agent's cache or built there (`agent.pyenv`, with uv), and the job runs inside it:
first on its PATH, bound read-only into its sandbox, its log's first line saying which
environment it got. A build that fails ends the attempt with uv's words."""

from __future__ import annotations

from chiffon.agent.attempts import Attempt
from chiffon.agent.hooks.base import AttemptHook
from chiffon.agent.hooks.files import job_folder
from chiffon.agent.pyenv import EnvFailed, ensure
from chiffon.agent.runner import CannotStart

ENVS = "envs"  # under the cache folder


class PythonEnvHook(AttemptHook):
    async def prestart(self, attempt: Attempt) -> None:
        work, run, cache = attempt.work, attempt.run, self.parts.cache
        if work is None or not work.python_env or run is None or cache is None:
            return
        if work.workdir:  # a folder of the desktop's, read as the agent's user: never
            raise CannotStart("--python-env builds the job's own folder, not a workdir")
        try:
            env = await ensure(job_folder(attempt, work), cache.root / ENVS)
        except EnvFailed as exc:
            raise CannotStart(str(exc)) from None
        run.python_env = env.path
        run.preface = env.line().encode()
