"""Stop sequences in streamed text: nothing of a stop string is ever shown."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from skulk.engine.textstream import StopText


def stream(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    """Feed ``pieces`` like a detokenizer would; returns (shown text, stopped)."""
    st_ = StopText(stops)
    shown = []
    for piece in pieces:
        out, stopped = st_.push(piece)
        shown.append(out)
        if stopped:
            return "".join(shown), True
    shown.append(st_.flush())
    return "".join(shown), False


def test_no_stops_passes_text_through() -> None:
    st_ = StopText([])
    assert st_.push("abc") == ("abc", False)
    assert st_.flush() == ""


def test_holds_back_a_possible_stop_prefix_then_releases_it() -> None:
    st_ = StopText(["</end>"])
    assert st_.push("hello </e") == ("hello ", False)
    # The held text turns out not to be a stop: it is released with what follows.
    assert st_.push("x") == ("</ex", False)
    assert st_.flush() == ""


def test_match_across_pushes_cuts_before_the_stop() -> None:
    assert stream(["The end", " is ne", "ar. More"], ["is near"]) == ("The end ", True)


def test_the_stop_that_completes_first_wins() -> None:
    assert stream(["abc STOP2 then STOP1"], ["STOP1", "STOP2"]) == ("abc ", True)
    # "bc" completes before "abcd" does, whether streamed or pushed at once.
    assert stream(["abcd"], ["abcd", "bc"]) == ("a", True)
    assert stream(["a", "b", "c", "d"], ["abcd", "bc"]) == ("a", True)


def test_flush_releases_a_dangling_prefix_at_the_end() -> None:
    assert stream(["value: <st"], ["<stop>"]) == ("value: <st", False)


def test_empty_stop_strings_are_ignored() -> None:
    assert stream(["abc"], ["", ""]) == ("abc", False)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab<>/ ", max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
    stops=st.lists(st.text(alphabet="ab<>/ ", min_size=1, max_size=5), max_size=4),
)
def test_shown_text_is_the_text_cut_at_the_first_stop(text: str, cuts: list[int], stops: list[str]) -> None:
    # Invariant of the module: however the text is split into pieces, what is
    # shown equals the text cut just before the stop that completes first.
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    found = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    expected = (text, False) if not found else (text[: min(found)[1]], True)
    assert stream(pieces, stops) == expected
    # Streaming one character at a time agrees with any other split.
    assert stream(list(text), stops) == expected
