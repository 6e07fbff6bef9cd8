"""Stop strings, matched as the reply's text grows: an Aho-Corasick automaton over all of them, so each new
character costs O(1) amortized however many stop strings there are and however long.

The automaton's state is the longest suffix of the text that begins some stop string: that much of
the text must be held back from the client until the next characters say whether a stop follows.
"""


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.goto: list[dict] = [{}]       # node -> char -> node (a trie of the stop strings)
        self.fail, self.depth, self.match = [0], [0], [0]   # match: longest stop ending at this node (0: none)
        for s in stops:
            self._insert(s)
        self._link()
        self.state, self.fed = 0, ""

    def _insert(self, s: str):
        node = 0
        for c in s:
            if c not in self.goto[node]:
                self.goto.append({})
                self.fail.append(0)
                self.depth.append(self.depth[node] + 1)
                self.match.append(0)
                self.goto[node][c] = len(self.goto) - 1
            node = self.goto[node][c]
        self.match[node] = len(s)

    def _link(self):
        queue = list(self.goto[0].values())        # breadth first: a node's fail link is shallower
        for node in queue:
            for c, child in self.goto[node].items():
                f = self.fail[node]
                while f and c not in self.goto[f]:
                    f = self.fail[f]
                self.fail[child] = self.goto[f].get(c, 0) if self.goto[f].get(c, 0) != child else 0
                self.match[child] = self.match[child] or self.match[self.fail[child]]
                queue.append(child)

    def feed(self, text: str) -> int | None:
        """The whole text so far (it usually only grew); where the first stop string in it begins, or None."""
        start = len(self.fed)
        if not text.startswith(self.fed):      # decoding revised earlier characters: match again
            self.state, start = 0, 0
        for i in range(start, len(text)):
            self.state = self._step(self.state, text[i])
            if self.match[self.state]:
                self.fed = text[:i + 1]
                return i + 1 - self.match[self.state]
        self.fed = text
        return None

    def _step(self, node: int, c: str) -> int:
        while node and c not in self.goto[node]:
            node = self.fail[node]
        return self.goto[node].get(c, 0)

    @property
    def held(self) -> int:
        """Characters at the text's end that may be the start of a stop string."""
        return self.depth[self.state]
