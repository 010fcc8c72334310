"""session_slots.py: the inbound session counts shared by the intake processes (in one process
here: two SharedSessionCount on one memfd stand for two intake processes)."""
from mailengine.session_slots import SessionSlots, SharedSessionCount, address_bucket


def test_two_processes_share_the_cap_and_the_per_address_limit():
    slots = SessionSlots(3)
    a, b = (SharedSessionCount(slots.fd, slots.take()) for _ in range(2))
    assert a.admit("192.0.2.1", 3, 2, False, False) is None
    assert b.admit("192.0.2.1", 3, 2, False, False) is None
    assert b.admit("192.0.2.1", 3, 2, False, False) == "address"  # 2 from it in the engine
    assert b.admit("192.0.2.1", 3, 2, False, True) is None  # exempt: counted all the same
    assert a.admit("192.0.2.2", 3, 2, False, False) == "cap"  # 3 sessions in the engine
    assert a.admit("192.0.2.2", 3, 2, True, False) is None  # priority address: over the cap
    assert slots.total() == 4
    a.release("192.0.2.2")
    assert slots.total() == 3


def test_a_dead_process_takes_its_sessions_with_it_and_its_slot_is_reused():
    slots = SessionSlots(2)
    first = slots.take()
    a = SharedSessionCount(slots.fd, first)
    for _ in range(5):
        assert a.admit("192.0.2.7", 100, 0, False, False) is None
    b = SharedSessionCount(slots.fd, slots.take())
    assert slots.take() is None  # all in use: a new process would count alone
    assert b.admit("192.0.2.7", 5, 0, False, False) == "cap"
    slots.give_back(first)  # its process ended (SIGKILL, say)
    assert slots.total() == 0 and b.admit("192.0.2.7", 5, 5, False, False) is None
    assert slots.take() == first


def test_an_address_has_the_same_bucket_in_every_process():
    assert address_bucket("2001:db8::1") == address_bucket("2001:db8::1")
    assert len({address_bucket(f"192.0.2.{i}") for i in range(200)}) > 150
