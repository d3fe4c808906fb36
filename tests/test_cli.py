"""The ``qat`` command's own behaviour: what it silences of Lightning, and nothing more."""

from __future__ import annotations

import logging
import warnings

import pytest

from qat.app.quiet import silence_notices

LEAFSPEC = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead."
TENSORBOARD = "Starting from v1.9.0, `tensorboardX` has been removed as a dependency of the `lightning.pytorch` package"


def _shown(message: str, category: type[Warning], module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_notices()
        warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 21, module=module)
    return bool(caught)


@pytest.mark.parametrize(("message", "category", "module"), [
    (LEAFSPEC, FutureWarning, "lightning.pytorch.utilities._pytree"),
    (TENSORBOARD, UserWarning, "lightning.pytorch.trainer.connectors.logger_connector.logger_connector"),
])
def test_lightnings_notices_are_silenced(message, category, module):
    assert not _shown(message, category, module)


@pytest.mark.parametrize(("message", "category", "module"), [
    (LEAFSPEC, FutureWarning, "my_project.trees"),  # the same words from elsewhere still show
    ("something else is deprecated", FutureWarning, "lightning.pytorch.utilities._pytree"),
])
def test_other_warnings_still_show(message, category, module):
    assert _shown(message, category, module)


def test_lightnings_tips_are_dropped_and_its_other_lines_kept(caplog):
    silence_notices()
    silence_notices()  # idempotent
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert len(logger.filters) == len(set(map(id, logger.filters)))
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        logger.info("💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](https://pypi.org/project/litmodels/)")
        logger.info("GPU available: False, used: False")
    assert [record.getMessage() for record in caplog.records] == ["GPU available: False, used: False"]
