"""Stop sequences over streamed text: what may be sent on, and where the answer ends.

Text that could be the start of a stop sequence is held back until the next pieces decide it,
so a stream never sends part of a stop sequence it then has to take back.
"""

from collections.abc import Sequence


class StopSequences:
    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.hit = False

    def feed(self, text: str) -> str:
        """The text that is now safe to send; sets `hit` once a stop sequence appears (the
        returned text then ends just before it)."""
        if self.hit:
            return ""
        text = self._held + text
        self._held = ""
        cuts = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if cuts:
            self.hit = True
            return text[: min(cuts)]
        keep = self._partial_tail(text)
        if keep:
            self._held = text[-keep:]
            return text[:-keep]
        return text

    def flush(self) -> str:
        """What was held back, once the answer ended without a stop sequence."""
        text, self._held = self._held, ""
        return text

    def _partial_tail(self, text: str) -> int:
        """The length of the longest end of `text` that begins some stop sequence."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-n:]):
                    longest = n
                    break
        return longest
