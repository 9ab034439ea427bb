"""The hooks every attempt runs, in order, at each named point (`hooks.base`).

Adding one: a module beside these with an `AttemptHook` subclass, and one line here.
"""

from __future__ import annotations

from chiffon.agent.hooks.alive import AliveCheck
from chiffon.agent.hooks.base import AttemptHook, HookParts
from chiffon.agent.hooks.disk import DiskCap, RemoveFiles
from chiffon.agent.hooks.files import PeriodicCheckpoint, SaveFiles, StageIn
from chiffon.agent.hooks.gpu_hygiene import GpuHygieneHook
from chiffon.agent.hooks.logs import LogShipping
from chiffon.agent.hooks.outbox import SaveEnd
from chiffon.agent.hooks.pyenv import PythonEnvHook
from chiffon.agent.hooks.usage import PeakUsage

# At `prestart`: the job's files are laid in, then its Python environment is made. At
# `exited`, in this order: the alive check and the periodic checkpoint stop, the peak VRAM
# joins the end, its outputs and checkpoint are sent, the end is saved (the outbox), the
# rest of the output is shipped; the end is said after. At `stop`, last: the attempt's
# files are removed once its end was heard.
HOOKS: tuple[type[AttemptHook], ...] = (StageIn, PythonEnvHook, AliveCheck, DiskCap,
                                        PeriodicCheckpoint, PeakUsage, SaveFiles, SaveEnd,
                                        LogShipping, GpuHygieneHook, RemoveFiles)  # fmt: skip

__all__ = ["HOOKS", "AttemptHook", "HookParts"]
