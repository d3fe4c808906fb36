"""What the ``qat`` command silences: Lightning's notices that say nothing about the run
(:func:`silence_notices`) and LightningCLI's warning about the arguments the app gives it on purpose
(:func:`args_on_purpose`).

Each is matched precisely (by message, and by the module that emits it where others could say the
same), so every other warning and log line still shows. Only the application calls these; the
library leaves the process's warning filters and loggers alone.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

_TIP = "💡 Tip:"
"""How Lightning starts its advertisements (litlogger, litmodels), logged at INFO by every Trainer."""


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIP)


_NO_TIPS = _NoTips()


def silence_notices() -> None:
    """Drop Lightning's tips, its ``LeafSpec`` deprecation warning (Lightning's own use of a torch API,
    nothing a user can change) and its notice that tensorboardX is not installed (the CSV logger
    stands in). Calling it again adds nothing."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NO_TIPS)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
                            module=r"lightning\.pytorch\.utilities\._pytree")
    warnings.filterwarnings("ignore", message=r"Starting from v1\.9\.0, `tensorboardX` has been removed",
                            module=r"lightning\.pytorch\.trainer\.connectors\.logger_connector")


@contextlib.contextmanager
def args_on_purpose() -> Iterator[None]:
    """Around a LightningCLI given ``args=``: it warns when ``sys.argv`` holds arguments too, against
    mixing them up by mistake; the app passes its own arguments on purpose (``qat run``'s are its own)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
        yield
