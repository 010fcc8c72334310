"""last_one.py: a function of one key that remembers its last answer."""
from mailengine.last_one import LastOne


def test_the_last_answer_is_reused_for_the_same_key_only():
    made: list[int] = []
    f = LastOne(lambda k: (made.append(k), k * 2)[1])
    assert [f(1), f(1), f(2), f(1)] == [2, 2, 4, 2]
    assert made == [1, 2, 1]
