"""qft.console: the listed library noise is silenced, anything else still shows, --verbose keeps all."""
import logging
import warnings

import pytest

from qft import console


@pytest.fixture
def restore_logging():
    names = [n for n, _, _ in console.LOG_LINES] + console.QUIET_LOGGERS
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters)) for n in names}
    for n in names:  # start clean: an earlier test may have run a qft entry point, which calls quiet()
        lg = logging.getLogger(n)
        lg.setLevel(logging.NOTSET)
        lg.filters[:] = [f for f in lg.filters if not isinstance(f, console._DropMessages)]
    yield
    for n, (level, filters) in saved.items():
        lg = logging.getLogger(n)
        lg.setLevel(level)
        lg.filters[:] = filters


def _emit():
    warnings.warn("Found 187 module(s) in eval mode at the start of training. This may lead to ...")
    warnings.warn("something a user should act on")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no module")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a real bitsandbytes problem")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").info("💡 Tip: install a cloud product")


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_drops_only_the_listed_noise(caplog, restore_logging, verbose):
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet(verbose=verbose)
        _emit()
    shown = [str(w.message) for w in caught]
    logged = [r.getMessage() for r in caplog.records]
    assert "something a user should act on" in shown and "a real bitsandbytes problem" in logged
    noise_shown = any("eval mode" in m for m in shown)
    noise_logged = any("kernels-community" in m or "Tip" in m for m in logged)
    assert noise_shown == verbose and noise_logged == verbose
