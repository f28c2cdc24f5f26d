"""The history checker against hand-made histories: a clean one passes, and
each bad one is flagged under its invariant, and only there."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from history import Fault, History, Op, Policy, Token, check  # noqa: E402

POLICY = Policy(session=20, token=15, renew=10, grace=1)
T0 = 1_800_000_000.0


def tok(sid="s1", jti="t1", iat=int(T0), exp=None, auth_time=int(T0)):
    return Token(sid=sid, jti=jti, iat=iat, exp=exp if exp is not None else iat + 15,
                 auth_time=auth_time)


def op(kind, replica, start, status, sent=None, new=None, code="", dur=0.01):
    return Op(kind=kind, replica=replica, start=T0 + start, end=T0 + start + dur, status=status,
              code=code, sent=sent, new=new)


def clean() -> History:
    """Login, verifies on both replicas, a racing refresh answered with the
    same new token twice, a logout, then a 401 on both replicas."""
    h = History(policy=POLICY)
    t1 = tok()
    t2 = tok(jti="t2", iat=int(T0) + 2)
    h.ops += [
        op("login", "a", 0.0, 200, new=t1),
        op("verify", "a", 0.5, 200, sent=t1),
        op("verify", "b", 0.6, 200, sent=t1),
        op("refresh", "a", 2.0, 200, sent=t1, new=t2),
        op("refresh", "b", 2.0, 200, sent=t1, new=t2),
        op("verify", "b", 3.0, 200, sent=t2),
        op("logout", "a", 4.0, 204, sent=t2),
        op("verify", "b", 4.5, 200, sent=t2),  # within the 1 s propagation
        op("verify", "b", 5.5, 401, sent=t2, code="REVOKED_SESSION"),
        op("verify", "a", 5.5, 401, sent=t2, code="REVOKED_SESSION"),
    ]
    return h


def flagged(h: History) -> set:
    v = check(h)
    return {n for n, msgs in v.violations.items() if msgs}


def test_a_clean_history_passes():
    v = check(clean())
    assert v.ok, v.summary()
    assert v.figures["requests"] == 10
    assert v.figures["false_401"] == 0
    assert v.figures["racing_refreshes"] == 1


def test_1_a_token_refreshed_into_two_tokens_is_flagged():
    h = clean()
    other = tok(jti="t2-other", iat=int(T0) + 2)
    h.ops.append(op("refresh", "b", 2.1, 200, sent=tok(), new=other))
    assert flagged(h) == {1}
    # A renewal by /v1/verify counts too.
    h = clean()
    h.ops.append(op("verify", "b", 2.1, 200, sent=tok(), new=other))
    assert flagged(h) == {1}


def test_2_a_logged_out_session_accepted_by_a_connected_replica_is_flagged():
    h = clean()
    h.ops.append(op("verify", "b", 5.2, 200, sent=tok(jti="t2", iat=int(T0) + 2)))
    assert flagged(h) == {2}


def test_2_a_cut_off_replica_may_lag_up_to_the_bound_and_no_more():
    h = clean()
    t2 = tok(jti="t2", iat=int(T0) + 2)
    h.faults.append(Fault("partition", frozenset({"b"}), T0 + 3.5, T0 + 20, cuts_off=True))
    # 8 s after the logout, cut off: within the 10 s lag.
    h.ops.append(op("verify", "b", 12.0, 200, sent=t2))
    h.ops = [o for o in h.ops if not (o.replica == "b" and o.status == 401)]
    assert flagged(h) == set(), check(h).summary()
    # 11 s after it: past the lag.
    h.ops.append(op("verify", "b", 15.1, 200, sent=t2))
    assert flagged(h) == {2}
    # A fault that only slows the link does not stretch the bound.
    h = clean()
    h.faults.append(Fault("loss", frozenset({"b"}), T0 + 3.5, T0 + 20, cuts_off=False))
    h.ops.append(op("verify", "b", 7.0, 200, sent=t2))
    assert flagged(h) == {2}


def test_2_reuse_detection_revokes_too():
    h = clean()
    t1 = tok()
    # The spent t1 shown after the grace: 401, the session is revoked...
    h.ops.append(op("refresh", "a", 3.5, 401, sent=t1, code="TOKEN_ALREADY_REFRESHED"))
    assert flagged(h) == set(), check(h).summary()
    # ...so accepting t2 two seconds later is a violation.
    h.ops.append(op("verify", "a", 5.6, 200, sent=tok(jti="t2", iat=int(T0) + 2)))
    assert 2 in flagged(h)


def test_3_a_401_for_a_valid_token_is_flagged():
    h = clean()
    h.ops.append(op("verify", "b", 1.0, 401, sent=tok(), code="REVOKED_SESSION"))
    assert flagged(h) == {3}
    assert check(h).figures["false_401"] == 1


def test_3_a_correct_login_refused_is_flagged():
    h = clean()
    h.ops.append(op("login", "b", 1.0, 401, code="INVALID_CREDENTIALS"))
    assert flagged(h) == {3}


def test_3_a_spent_token_within_the_grace_must_not_be_refused():
    h = clean()
    # t1 refreshed at 2.0; shown again at 2.5 (within the 1 s grace): a 401
    # is false. At 3.5 it is not.
    h.ops.append(op("refresh", "a", 2.5, 401, sent=tok(), code="TOKEN_ALREADY_REFRESHED"))
    # (It revoked the session too: the accepted t2 after it is one more.)
    assert flagged(h) == {2, 3}
    h = clean()
    h.ops.append(op("refresh", "a", 3.5, 401, sent=tok(), code="TOKEN_ALREADY_REFRESHED"))
    assert flagged(h) == set()


def test_3_401_is_allowed_when_a_rule_explains_it():
    h = clean()
    t = tok(sid="s9", jti="t9", iat=int(T0), auth_time=int(T0))
    h.ops += [
        # Past the session end and past the renew limit: both explained.
        op("verify", "a", 20.5, 401, sent=t, code="EXPIRED_SESSION"),
        # A logout answered 503 may take effect later: a 401 after it is fair.
        op("logout", "b", 6.0, 503, sent=tok(sid="s8", jti="t8"), code="STORE_UNAVAILABLE"),
        op("verify", "a", 7.0, 401, sent=tok(sid="s8", jti="t8"), code="REVOKED_SESSION"),
    ]
    h.faults.append(Fault("partition", frozenset({"b"}), T0 + 5.5, T0 + 6.5, cuts_off=True))
    assert flagged(h) == set(), check(h).summary()


def test_4_a_session_accepted_after_its_end_is_flagged():
    h = clean()
    t = tok(sid="s5", jti="t5", iat=int(T0) + 10, auth_time=int(T0))
    h.ops.append(op("verify", "a", 20.5, 200, sent=t))
    assert flagged(h) == {4}


def test_4_a_token_issued_past_the_session_end_is_flagged():
    h = clean()
    old = tok(sid="s6", jti="t6", iat=int(T0) + 10, auth_time=int(T0))
    new = tok(sid="s6", jti="t7", iat=int(T0) + 12, exp=int(T0) + 27, auth_time=int(T0))
    h.ops.append(op("refresh", "a", 12.0, 200, sent=old, new=new))
    assert flagged(h) == {4}


def test_5_a_503_without_a_fault_is_flagged():
    h = clean()
    h.ops.append(op("verify", "b", 1.0, 503, sent=tok(), code="STORE_UNAVAILABLE"))
    assert flagged(h) == {5}
    # During a fault on b, or within the recovery after it: fine.
    h.faults.append(Fault("partition", frozenset({"b"}), T0 + 0.5, T0 + 0.9, cuts_off=True))
    assert flagged(h) == set()
    # A fault on the other replica does not excuse it.
    h.faults[0] = Fault("partition", frozenset({"a"}), T0 + 0.5, T0 + 0.9, cuts_off=True)
    assert flagged(h) == {5}
    # Nor does one long healed.
    h.faults[0] = Fault("partition", frozenset({"b"}), T0 - 20, T0 - 10, cuts_off=True)
    assert flagged(h) == {5}
