"""verdict.py: what delivery does after each reply, decided without sockets."""
import pytest

from mailengine import verdict
from mailengine.outcome import RcptOutcome
from mailengine.smtp.client import RecipientResult, TransactionResult
from mailengine.verdict import Action, Fate, Signal, Step


def tx(*recipients, site_failure=False):
    """A transaction result as the SMTP client makes it: (address, code, enhanced, stage)."""
    rs = [RecipientResult(a, code, enh, "text", stage) for a, code, enh, stage in recipients]
    return TransactionResult("s@a.test", rs, None, site_failure, False, [], [])


def fates(v):
    return {r.address: f for r, f in zip(v.recipients, v.fates)}


def test_all_delivered():
    v = verdict.transaction(tx(("a@x", 250, "2.0.0", "body"), ("b@x", 250, "", "body")), True)
    assert v.fates == (Fate.DELIVERED, Fate.DELIVERED) and v.action is Action.DONE
    assert all(f.decided for f in v.fates)


@pytest.mark.parametrize("code,enhanced,stage,fate", [
    (550, "5.1.1", "rcpt", Fate.FAILED),
    (554, "", "body", Fate.FAILED),
    (552, "5.3.4", "local", Fate.FAILED),   # too big for the server: refused before sending
    (552, "5.2.2", "rcpt", Fate.RETRY),     # mailbox full: soft behind a 5xx, not a 4xx
    (451, "4.3.0", "local", Fate.RETRY),    # made up here: no other server would do better
    (450, "4.2.0", "rcpt", Fate.NEXT_MX),   # greylisting at one server says nothing of others
    (451, "4.3.0", "mail", Fate.NEXT_MX),
    (451, "", "data", Fate.NEXT_MX),
    (452, "4.3.1", "body", Fate.NEXT_MX),
    (452, "4.5.3", "rcpt", Fate.NEXT_MX),   # too many recipients, but nobody got through
])
def test_one_recipient(code, enhanced, stage, fate):
    v = verdict.transaction(tx(("a@x", code, enhanced, stage)), True)
    assert v.fates == (fate,) and v.action is Action.DONE
    assert v.who(fate) == ["a@x"]


def test_too_many_recipients_go_again_on_this_session():
    result = tx(("a@x", 250, "2.0.0", "body"), ("b@x", 452, "4.5.3", "rcpt"),
                ("c@x", 452, "", "rcpt"), ("d@x", 452, "4.2.2", "rcpt"))
    v = verdict.transaction(result, True)
    assert fates(v) == {"a@x": Fate.DELIVERED, "b@x": Fate.AGAIN, "c@x": Fate.AGAIN,
                        "d@x": Fate.NEXT_MX}  # 4.2.2 is a full mailbox, not the limit
    assert v.action is Action.AGAIN and v.who(Fate.AGAIN) == ["b@x", "c@x"]
    # the session cannot carry another transaction: the next MX host instead
    v = verdict.transaction(result, False)
    assert v.who(Fate.NEXT_MX) == ["b@x", "c@x", "d@x"] and v.action is Action.DONE


def test_session_failure_leaves_the_host():
    # 421 at DATA: every open recipient soft, the session dead
    result = tx(("a@x", 550, "5.1.1", "rcpt"), ("b@x", 421, "4.7.0", "data"),
                ("c@x", 452, "4.5.3", "rcpt"), site_failure=True)
    v = verdict.transaction(result, False)
    assert fates(v) == {"a@x": Fate.FAILED, "b@x": Fate.NEXT_MX, "c@x": Fate.NEXT_MX}
    assert v.action is Action.LEAVE_HOST
    # a session that failed after every recipient was decided leaves nothing to move
    v = verdict.transaction(tx(("a@x", 550, "5.1.1", "rcpt"), site_failure=True), False)
    assert v.fates == (Fate.FAILED,) and v.action is Action.DONE


def test_lost_connection_is_next_mx():
    v = verdict.transaction(tx(("a@x", 451, "4.4.2", "connection"),
                               ("b@x", 451, "4.4.2", "connection"), site_failure=True), False)
    assert v.fates == (Fate.NEXT_MX, Fate.NEXT_MX) and v.action is Action.LEAVE_HOST
    # the same made-up reply without a failed session (the client's "no outcome") is final
    v = verdict.transaction(tx(("a@x", 451, "4.3.0", "connection")), True)
    assert v.fates == (Fate.RETRY,)


def test_rules_are_ordered_data():
    # the 452 rule comes before the general 4xx one, the session failure before both
    rules = [fate for _, fate in verdict.RECIPIENT_RULES]
    assert rules == [Fate.NEXT_MX, Fate.AGAIN, Fate.NEXT_MX]


@pytest.mark.parametrize("pending,rest,failed,reused,fresh,step", [
    (["a", "b"], ["a", "b"], True, True, False, Step.FRESH),       # kept connection was dead
    (["a", "b"], ["a", "b"], True, True, True, Step.NEXT_MX),      # dead once more
    (["a", "b"], ["a", "b"], True, False, False, Step.NEXT_MX),    # a new connection failed
    (["a", "b"], ["b"], True, True, False, Step.NEXT_MX),          # failed after progress
    (["a", "b"], ["a", "b"], False, False, False, Step.NEXT_MX),   # no progress at all
    (["a", "b"], ["b"], False, True, False, Step.RECONNECT),       # ended with work left
    (["a", "b"], [], False, True, False, Step.DONE),
    (["a", "b"], [], True, True, False, Step.DONE),                # failed after deciding all
])
def test_after_session(pending, rest, failed, reused, fresh, step):
    assert verdict.after_session(pending, rest, failed, reused, fresh) is step


def out(code, enhanced="", stage="rcpt", address="a@x"):
    return RcptOutcome.from_reply(address, code, enhanced, "text", stage)


def test_give_up_keeps_the_last_word():
    last = {"a@x": out(450, "4.2.0"), "b@x": out(550, "5.7.1", "mail", "b@x")}
    got = verdict.give_up(["a@x", "b@x", "c@x"], last, "x.test")
    assert got[:2] == [last["a@x"], last["b@x"]]
    assert (got[2].address, got[2].code, got[2].enhanced, got[2].stage) == \
        ("c@x", 451, "4.4.1", "connect")
    assert got[2].text == "No mail server of x.test could be reached"


def test_site_trouble():
    assert verdict.site_trouble(out(421, "4.7.0", "rcpt"))
    assert verdict.site_trouble(out(451, "4.4.1", "connect"))
    assert verdict.site_trouble(out(451, "4.4.2", "connection"))
    assert not verdict.site_trouble(out(450, "4.2.0", "rcpt"))


@pytest.mark.parametrize("outcomes,signal", [
    ([], Signal.NONE),
    ([out(250, "2.0.0", "body"), out(451, "4.4.1", "connect")], Signal.SUCCESS),
    ([out(450, "4.2.0")], Signal.FAILURE),
    ([out(450, "4.2.0"), out(421, "4.7.0", "data")], Signal.SITE_FAILURE),
    ([out(451, "4.4.1", "connect")], Signal.SITE_FAILURE),
    ([out(451, "4.4.2", "connection")], Signal.SITE_FAILURE),
    ([out(550, "5.1.1")], Signal.NONE),                 # the server works; the address does not
    ([out(451, "4.4.3", "dns")], Signal.NONE),          # no server was talked to
    ([out(552, "5.2.2")], Signal.FAILURE),              # mailbox full: soft
])
def test_window_signal(outcomes, signal):
    assert verdict.window_signal(outcomes) is signal
