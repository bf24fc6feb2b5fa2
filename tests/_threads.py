"""Runs a test's worker in threads and collects what they raise."""

from __future__ import annotations

import threading
from typing import Callable, List


def run_in_threads(worker: Callable[[int], None], n: int, *, together: bool = False) -> List[BaseException]:
    """Calls worker(i) for i in 0..n-1, each in a thread of its own (released at once from a
    barrier when `together`), waits for all of them and returns the exceptions they raised."""
    errors: List[BaseException] = []
    start = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            if together:
                start.wait()
            worker(i)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
