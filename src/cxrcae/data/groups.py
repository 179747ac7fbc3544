"""Union-find over item indices: how splits and the audit merge images into groups.

``cxrcae.data.splits`` joins images of one patient or with identical pixels (so a group never straddles two
splits); ``cxrcae.data.audit`` joins chains of near-duplicate images. Both need only indices ``0..n-1``,
so this module depends on nothing.
"""

from __future__ import annotations


class UnionFind:
    """Disjoint sets of ``0..n-1``; a set's root is its smallest member, so results never depend on the
    order in which pairs are joined."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        """Every set as an ascending list of members, sets ordered by their smallest member."""
        members: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            members.setdefault(self.find(i), []).append(i)
        return list(members.values())
