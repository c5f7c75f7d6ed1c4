"""Incremental detokenization and stop strings for one request's output.

Text is decoded from a sliding window of tokens (``prefix_offset`` .. end) so each step costs
O(window), and a delta is released only once it no longer ends in an incomplete UTF-8 sequence
(shown as U+FFFD). While stop strings are set, the last ``len(longest stop) - 1`` characters are
held back so a stream never shows the start of a stop string it will then retract.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""            # all output text decoded so far (stop string removed at the end)
        self.emitted = 0          # characters of ``text`` already handed out
        self._ids = list(prompt_token_ids[-6:])  # context window for decode boundaries
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append a token; returns the matched stop string if the text now contains one
        (looked for only with ``check_stop``: not among a request's first ``min_tokens``)."""
        self._ids.append(token_id)
        prefix = self.tokenizer.decode(self._ids[self._prefix_offset:self._read_offset],
                                       skip_special_tokens=True)
        full = self.tokenizer.decode(self._ids[self._prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            start = max(0, len(self.text) - self.holdback)
            self.text += new
            found = [(pos, stop) for stop in (self.stop if check_stop else ())
                     if (pos := self.text.find(stop, start)) != -1]
            if found:
                pos, stop = min(found)
                self.text = self.text[:pos]
                return stop
        return None

    def delta(self, finished: bool) -> str:
        """Text not yet handed out, keeping back a possible stop-string start unless finished."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
