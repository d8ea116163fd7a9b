"""Leaving a process that was in a torch.distributed group."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_without_finalizers(code: int) -> NoReturn:
    """Leaves a process that was in a distributed group (a trainer once its last checkpoint is on disk, a
    pipeline member), skipping the interpreter's teardown.

    After the group is gone, torch and gloo may still own threads that call back into Python; when the
    interpreter finalises under them, such a thread is unwound through C++ code that cannot be unwound
    and the process aborts ("terminate called without an active exception", exit -6). torchrun would
    report a finished job as failed, and the operator would restart it. Nothing is left to clean up.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
