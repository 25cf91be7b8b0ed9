"""State and the strict ``apply`` (DESIGN.md section 2, "State and apply")."""

from __future__ import annotations

from typing import get_args

import pytest

from skulk.core import placement
from skulk.core.events import (
    LOCAL_EVENT_TYPES,
    Carryover,
    Event,
    IndexedEvent,
    InstanceStillHosted,
    NodeGatheredInfo,
    SessionStarted,
)
from skulk.core.ids import NodeId
from skulk.core.state import LOCAL_ONLY, TRANSITIONS, apply, digest
from tests.core.builders import CONFIG, GB, build_state, cards_of, command, full_mesh, make_card, mem, placed


def test_every_event_type_has_exactly_one_transition_or_is_local_only() -> None:
    covered = set(TRANSITIONS) | set(LOCAL_ONLY) | {SessionStarted}
    assert covered == set(get_args(Event))
    assert not set(TRANSITIONS) & set(LOCAL_ONLY)
    assert set(LOCAL_ONLY) <= set(LOCAL_EVENT_TYPES), "a local-only event is one a worker raises"


def test_apply_is_strict_about_the_next_index_and_session_started() -> None:
    state = build_state({"a": mem(64 * GB)})
    assert state.session is not None
    event = NodeGatheredInfo(node_id=NodeId("b"))
    with pytest.raises(AssertionError, match="expected index"):
        apply(state, IndexedEvent(index=state.last_index + 2, event=event, at=1.0))
    restart = SessionStarted(session=state.session, carryover=Carryover())
    with pytest.raises(AssertionError, match="must be event 0"):
        apply(state, IndexedEvent(index=state.last_index + 1, event=restart, at=1.0))


def test_a_local_only_event_never_takes_an_index() -> None:
    state = build_state({"a": mem(64 * GB)}, full_mesh(["a"]))
    inst = placed(placement.place(state, command(), cards_of(make_card(weight_bytes=GB)), CONFIG))
    with pytest.raises(AssertionError, match="never takes an index"):
        apply(state, IndexedEvent(index=state.last_index + 1, event=InstanceStillHosted(instance=inst), at=1.0))


def test_equal_prefixes_give_equal_digests() -> None:
    a = build_state({"a": mem(64 * GB), "b": mem(32 * GB)})
    b = build_state({"a": mem(64 * GB), "b": mem(32 * GB)})
    assert a == b and digest(a) == digest(b)
    assert digest(build_state({"a": mem(64 * GB)})) != digest(a)


def test_encode_state_is_msgpack_of_the_wire_form_however_its_parts_are_shared() -> None:
    """Persisting reuses the bytes of parts an earlier state shared; the bytes stay exactly the plain encoding."""
    import msgspec

    from skulk.core.codec import to_wire
    from skulk.core.events import IndexedEvent, InstanceCreated, NodeGatheredInfo
    from skulk.core.state import decode_state, encode_state

    plain = msgspec.msgpack.Encoder(order="sorted")
    state = build_state({"a": mem(64 * GB), "b": mem(32 * GB)}, full_mesh(["a", "b"]))
    seen = []
    for i in range(6):
        inst = placed(placement.place(state, command(cid=f"c{i}"), cards_of(make_card(weight_bytes=GB)), CONFIG))
        for event in (InstanceCreated(instance=inst), NodeGatheredInfo(node_id=NodeId("a"), memory=mem(64 * GB, (60 - i) * GB))):
            state = apply(state, IndexedEvent(index=state.last_index + 1, event=event, at=float(i)))
            seen.append(state)
            assert encode_state(state) == plain.encode(to_wire(state))
    # Earlier states, met again after later ones (their parts memoised meanwhile), still encode exactly.
    for old in seen:
        assert encode_state(old) == plain.encode(to_wire(old))
        assert decode_state(encode_state(old)) == old
