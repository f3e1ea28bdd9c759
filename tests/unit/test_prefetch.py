"""The training loop's read-ahead (heygen_ray/train/prefetch.py): order, bound, errors, close."""

import itertools
import threading
import time

import pytest

from heygen_ray.train.prefetch import Prefetch


def _wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_items_arrive_in_order_then_the_end():
    p = Prefetch(iter(range(100)), depth=3)
    assert list(p) == list(range(100))
    with pytest.raises(StopIteration):
        next(p)


def test_reading_starts_at_construction_and_stays_at_most_depth_ahead():
    produced = []
    started = threading.Event()

    def source():
        started.set()
        for i in itertools.count():
            produced.append(i)
            yield i

    p = Prefetch(source(), depth=2)
    assert started.wait(5.0)  # before anyone asked for an item
    _wait_for(lambda: len(produced) == 3)  # two queued and one in the thread's hand
    time.sleep(0.3)
    assert len(produced) == 3
    assert [next(p) for _ in range(4)] == [0, 1, 2, 3]
    _wait_for(lambda: len(produced) == 7)
    p.close()


def test_an_error_of_the_source_is_raised_where_the_consumer_reaches_it():
    def source():
        yield 1
        yield 2
        raise ValueError("row 3: corrupt")

    p = Prefetch(source(), depth=4)
    assert next(p) == 1 and next(p) == 2
    with pytest.raises(ValueError, match="row 3: corrupt"):
        next(p)
    with pytest.raises(StopIteration):  # the error is raised once, then the iterator is over
        next(p)


def test_close_stops_the_thread_of_an_endless_source():
    p = Prefetch(itertools.count(), depth=1)
    assert next(p) == 0
    p.close()
    assert not p.alive
    with pytest.raises(StopIteration):
        next(p)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetch(iter(()), depth=0)
