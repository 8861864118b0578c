import signal
from pathlib import Path

from kdsearch.paths import flocked, staging_path, stops_deferred


def test_staging_paths_are_hidden_beside_their_file_and_never_shared(tmp_path: Path) -> None:
    # two writers with one PID (PID 1 in two containers sharing a cache) get two files
    first, second = staging_path(tmp_path / "t.pt"), staging_path(tmp_path / "t.pt")
    assert first != second
    assert first.parent == second.parent == tmp_path  # one file system: the move is atomic
    assert first.name.startswith(".t.pt.") and first.name.endswith(".tmp")


def test_a_held_lock_is_refused_without_waiting_and_free_once_let_go(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with flocked(lock, wait=False) as held:
        assert held is True
        with flocked(lock, wait=False) as second:
            assert second is False  # another opening of the file, as another process's
    with flocked(lock, wait=False) as again:
        assert again is True
    with flocked(tmp_path / "missing" / "x.lock", wait=False) as unopenable:
        assert unopenable is None


def test_a_sigterm_in_a_deferred_block_reaches_its_handler_when_the_block_ends() -> None:
    heard: list[int] = []

    def mine(signum: int, _: object) -> None:
        heard.append(signum)

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with stops_deferred():
            signal.raise_signal(signal.SIGTERM)
            assert heard == []  # not yet
        assert heard == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is mine  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)
