"""torchrun, exiting with the exit code of the worker that failed first.

torchrun itself exits 1 whatever its workers exited with (it raises ``ChildFailedError``), so a
TrainJob's ``failurePolicy.permanentExitCodes`` would only ever see 1 from the pod. This runs torchrun's
own launcher (``torch.distributed.run``: the same options, read from the same ``PET_*`` variables)
and exits as the first failed worker did: its code, or 128 + the signal that killed it, as a shell
reports it. Used as ``python -m largo.runtime.launch [torchrun's options] script.py ...`` (the trainer
image's entry point).
"""

from __future__ import annotations

import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import parse_args, run

logger = logging.getLogger(__name__)


def shell_code(exitcode: int) -> int:
    """A process's exit status as a shell (and a container's state) gives it: a death by signal N is
    reported as -N by Python, 128 + N by the container runtime."""
    return 128 - exitcode if exitcode < 0 else exitcode


def first_failure(failures: dict[int, ProcessFailure]) -> ProcessFailure:
    """The worker that failed first: the others often fail because it did (their peer went away), or
    were stopped by torchrun with SIGTERM once it did. Timestamps are whole seconds: a worker torchrun
    stopped never comes before one that failed on its own."""
    return min(
        failures.values(),
        key=lambda failure: (failure.exitcode == -signal.SIGTERM, failure.timestamp, failure.local_rank),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # type: ignore[no-untyped-call]
    try:
        run(args)  # type: ignore[no-untyped-call]
    except ChildFailedError as error:
        failure = first_failure(error.failures)
        code = shell_code(failure.exitcode)
        logger.error(
            "worker %d (pid %d) failed first, exit code %d: %s",
            failure.local_rank,
            failure.pid,
            code,
            error.format_msg(),  # type: ignore[no-untyped-call]
        )
        return code
    except SignalException as stopped:  # SIGTERM from the kubelet: the pod is being deleted
        return 128 + int(stopped.sigval)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main())
