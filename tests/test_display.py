from __future__ import annotations

import pytest

from kdsearch.display import console, search_status
from kdsearch.study import Tally


def test_off_a_terminal_the_search_status_is_a_line_when_trials_have_finished(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert not console.is_terminal  # pytest captures stderr
    show = search_status(live=None, target=4)  # type: ignore[arg-type]
    for tally in (
        Tally(running=2),
        Tally(complete=1, running=2),
        Tally(complete=1, running=1),  # nothing new finished: no line
        Tally(complete=1, pruned=2, running=1, best=(0.5, 0, {"optim.lr": 0.1})),
        Tally(complete=2, pruned=2),  # the last: the command prints it with the time taken
    ):
        show(tally)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "trials 1/4: 1 complete, 0 pruned, 0 failed, 2 running",
        "trials 3/4: 1 complete, 2 pruned, 0 failed, 1 running; best 50.00% (#0: optim.lr=0.1)",
    ]
