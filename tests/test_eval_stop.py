"""`dsrl-fast eval` stops at once on SIGINT/SIGTERM, with the trainer's handlers (StopRequest with `stop_now`): a cache
write is never cut, the command prints one line and exits with 128 + the signal number, and a rerun continues from
the cached problems."""

from __future__ import annotations

import os
import signal

import pytest

from dsrl_fast.errors import RunStopped
from dsrl_fast.train.interrupt import StopRequest


class Stopped(RunStopped):
    def __init__(self, signum: int):
        super().__init__(signum, f"stopped by {signum}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_now_raises_at_once_but_never_inside_a_deferred_block(signum):
    before = signal.getsignal(signum)
    steps = []
    with pytest.raises(Stopped) as stopped, StopRequest(stop_now=Stopped) as stop:
        os.kill(os.getpid(), signum)
        steps.append("after the signal")  # never runs: the handler raised
    assert steps == [] and stopped.value.exit_code == 128 + signum

    with pytest.raises(Stopped), StopRequest(stop_now=Stopped) as stop:
        with stop.deferred():
            os.kill(os.getpid(), signum)
            steps.append("the write ends")
        steps.append("after the block")  # never runs: the block raised on its way out
    assert steps == ["the write ends"] and stop.signum == signum

    # a second signal inside the block stops at once (the user insists)
    with pytest.raises(Stopped), StopRequest(stop_now=Stopped) as stop:
        with stop.deferred():
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)
            steps.append("cut")
    assert steps == ["the write ends"]
    assert signal.getsignal(signum) is before  # the previous handler is back


def test_training_behaviour_is_unchanged(capsys):
    from dsrl_fast.errors import RunAborted

    with pytest.raises(RunAborted), StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # the first signal only asks
        with stop.deferred():  # no effect without stop_now
            pass
        os.kill(os.getpid(), signal.SIGTERM)
    assert "saving a checkpoint after this step" in capsys.readouterr().err
