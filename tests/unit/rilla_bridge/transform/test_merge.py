from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from rilla_bridge.transform.merge import merge_snapshots
from tests.fakes import load, snap, stored


def _item(rank: int, at: float, **fields: Any) -> dict[str, Any]:
    return {"rank": rank, "received_at": at, "fields": fields}


def test_pre_call_received_after_post_call_does_not_overwrite() -> None:
    post = snap("callrail", "post_call", load("callrail", "post_call"))
    pre = snap("callrail", "pre_call", load("callrail", "pre_call"))
    merged = merge_snapshots([stored(post, 10.0), stored(pre, 20.0)])
    assert merged["customer_name"] == "Jordan Pike"   # pre-call had the place "LAKEWOOD CO"
    assert merged["duration"] == 312
    assert merged["answered"] is True
    assert merged["recording"] == post.fields["recording"]
    assert merged["tags"] == ["new-customer", "roof-repair"]


def test_call_modified_recording_arriving_later_wins() -> None:
    post = snap("callrail", "post_call", load("callrail", "post_call_no_recording"))
    mod = snap("callrail", "call_modified", load("callrail", "call_modified_recording"))
    merged = merge_snapshots([stored(post, 1.0), stored(mod, 2.0)])
    assert merged["recording"] == mod.fields["recording"]
    # Arrival order does not matter, rank does.
    assert merge_snapshots([stored(mod, 1.0), stored(post, 2.0)])["recording"] == mod.fields[
        "recording"]


def test_empty_never_blanks_a_known_value() -> None:
    merged = merge_snapshots([
        _item(2, 1.0, agent_email="a@x.example", tags=["a"], note="n"),
        _item(3, 2.0, agent_email="", tags=[], note=None),
    ])
    assert merged == {"agent_email": "a@x.example", "tags": ["a"], "note": "n"}


def test_false_and_zero_are_real_values() -> None:
    merged = merge_snapshots([_item(2, 1.0, spam=True, value=5),
                              _item(3, 2.0, spam=False, value=0)])
    assert merged == {"spam": False, "value": 0}


def test_same_rank_later_received_wins() -> None:
    merged = merge_snapshots([_item(2, 5.0, x="late"), _item(2, 1.0, x="early")])
    assert merged["x"] == "late"


def test_higher_rank_beats_later_arrival() -> None:
    merged = merge_snapshots([_item(3, 1.0, x="modified"), _item(2, 9.0, x="post")])
    assert merged["x"] == "modified"


def test_keys_only_ever_empty_are_none() -> None:
    assert merge_snapshots([_item(0, 1.0, x=""), _item(1, 2.0, x=[])]) == {"x": None}
    assert merge_snapshots([]) == {}


_values = st.one_of(st.none(), st.just(""), st.just([]), st.booleans(), st.integers(0, 3),
                    st.sampled_from(["a", "b"]),
                    st.lists(st.sampled_from(["t1", "t2"]), max_size=2))
_items = st.lists(
    st.fixed_dictionaries({
        "rank": st.integers(0, 3),
        # A small set of times makes exact (rank, received_at) ties common.
        "received_at": st.sampled_from([1.0, 2.0, 3.0]),
        "fields": st.dictionaries(st.sampled_from(["k1", "k2", "k3"]), _values, max_size=3),
    }),
    max_size=6,
)


@given(items=_items, data=st.data())
def test_merge_is_order_independent(items: list[dict[str, Any]], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(items))
    assert merge_snapshots(list(shuffled)) == merge_snapshots(items)


@given(items=_items)
def test_merge_never_loses_a_known_value(items: list[dict[str, Any]]) -> None:
    merged = merge_snapshots(items)
    for item in items:
        for key, value in item["fields"].items():
            if value not in (None, "", []):
                assert merged[key] not in (None, "", []), key
