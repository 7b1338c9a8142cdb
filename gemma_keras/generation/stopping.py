"""When a row of generation stops, and the text it has produced so far: the bookkeeping the
host loop, streaming and chat share. Pure Python (no Keras), so the LiteRT runner, which runs
without Keras, follows the same rules.

The rules: a stop id ends its row and is kept in the row's ids but never in its text; a stop
string ends its row as soon as the row's text contains it, and the text is cut before it.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Sequence


def completion_ids(ids: Sequence[int], stop_ids) -> List[int]:
    """A row's generated ids without the stop id that ended it."""
    return list(ids[:-1]) if ids and ids[-1] in stop_ids else list(ids)


def cut_at_stop_strings(text: str, stop_strings) -> str:
    """`text` before the stop string that starts first. (Cutting at each string in turn
    missed an earlier-starting one that overlaps a later one: "xabcd" with ["cd", "abc"] was
    cut to "xab", not "x", when one token completed both.)"""
    cuts = [cut for cut in (text.find(s) for s in stop_strings or ()) if cut >= 0]
    return text[:min(cuts)] if cuts else text


class IncrementalText:
    """The text of a growing list of ids, decoded a few ids at a time rather than whole after
    every token.

    SentencePiece text is not always the concatenation of its pieces' texts (a character
    split over byte-fallback pieces, whitespace rules at the start of a decode), so the new
    ids are decoded together with the ones before them since the last clean boundary, and
    only what that adds is appended; a decode ending in U+FFFD (bytes of a character still to
    come) waits for more ids.
    """

    def __init__(self, detokenize: Callable[[List[int]], str]):
        self.detokenize = detokenize
        self.ids: List[int] = []
        self.text = ""
        self._prefix = 0  # ids[_prefix:_read] are decoded into the end of `text`
        self._read = 0

    def add(self, ids: Iterable[int]) -> str:
        """Appends ids; returns the text they completed ("" while a character is pending)."""
        self.ids.extend(ids)
        before = self.detokenize(self.ids[self._prefix:self._read])
        after = self.detokenize(self.ids[self._prefix:])
        if after.endswith("\ufffd") or not after.startswith(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        new = after[len(before):]
        self.text += new
        return new


class RowText:
    """A row's completion text while it is decoded, when something reads it before the end
    (stop strings, streaming)."""

    def __init__(self, tokenizer, stop_ids, stop_strings, skip_special):
        self.stop_ids, self.stop_strings = stop_ids, stop_strings or ()
        self._longest = max(map(len, self.stop_strings), default=0)
        self.visible = IncrementalText(lambda ids: tokenizer.detokenize(ids, skip_special))
        # Stop strings are matched on the text with special pieces written out, as they are
        # generated (a stop string may be a special piece's text).
        self.raw = (IncrementalText(tokenizer.detokenize) if self.stop_strings else None)

    def add(self, token: int) -> bool:
        """Records a generated token; returns whether a stop string has now appeared."""
        if token not in self.stop_ids:
            self.visible.add([token])
        if self.raw is None:
            return False
        searched = max(0, len(self.raw.text) - self._longest + 1)
        self.raw.add([token])
        return any(s in self.raw.text[searched:] for s in self.stop_strings)

    def settled(self) -> str:
        """The text that can no longer change: cut at a stop string, and without a tail that
        could still grow into one."""
        text = self.visible.text
        cut = cut_at_stop_strings(text, self.stop_strings)
        if len(cut) < len(text):
            return cut
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    text = text[:-n]
                    break
        return text


def growth(text: str, emitted: str) -> str:
    """What `text` adds to the already emitted `emitted` ("" when nothing)."""
    return text[len(emitted):] if len(text) > len(emitted) else ""
