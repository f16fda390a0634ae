"""Partitioning arithmetic for ZeroOptimizer: pure functions, testable without a process group.

Parameters of one class (same dtype, device and param group) are laid end to end in one flat
buffer, cut into buckets of whole parameters of about ``bucket_numel`` elements, and each
bucket is padded to a multiple of the world size. Rank r owns chunk r of every bucket: a
contiguous slice of ``bucket.numel // world_size`` elements, which may cut a parameter in two.
Buckets are the unit of communication (one reduce-scatter and one all-gather each), so stage 2
can send a bucket as soon as backward has produced its gradients.

With ``align`` > 1 (block-wise int8 state: ``align`` is ``lowbit.BLOCK``) every parameter
starts at a multiple of ``align`` and every bucket is padded to a multiple of
``world_size * align``, so every rank's chunk starts on a block boundary: no block of the
state straddles a chunk edge or a parameter edge, and a shard's blocks are exactly its
parameters' own blocks (the plain optimizer's, with zeros after a short last block). The
padding between parameters is part of no parameter, like the padding at a bucket's end.

A ``Layout`` is every class's buckets over one world size: rank r's shard k is its chunk of
the k-th bucket, counted class by class. ``reshard`` says which pieces a rank of one layout
copies from each rank of another (a checkpoint restored at another world size).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """One parameter's place in its flat buffer."""

    index: int  # position among the managed parameters
    offset: int  # first element in the flat buffer
    numel: int


@dataclass(frozen=True)
class Bucket:
    """A run of whole parameters, padded so that every rank's chunk has the same size."""

    start: int  # first element in the flat buffer
    numel: int  # padded: a multiple of the world size (times the alignment)
    segments: tuple[Segment, ...]

    def chunk(self, world_size: int) -> int:
        return self.numel // world_size

    def owned(self, rank: int, world_size: int) -> tuple[int, int]:
        """[lo, hi) of the flat buffer that ``rank`` owns in this bucket."""
        size = self.chunk(world_size)
        lo = self.start + rank * size
        return lo, lo + size

    def pieces(self, rank: int, world_size: int) -> list[tuple[int, int, int]]:
        """(parameter index, start in the rank's chunk, start in the parameter, length)
        for each parameter that overlaps ``rank``'s chunk."""
        lo, hi = self.owned(rank, world_size)
        out = []
        for seg in self.segments:
            a, b = max(lo, seg.offset), min(hi, seg.offset + seg.numel)
            if a < b:
                out.append((seg.index, a - lo, a - seg.offset, b - a))
        return out

    def gaps(self) -> list[tuple[int, int]]:
        """[lo, hi) of the flat buffer in this bucket that no parameter holds: the padding
        after each parameter (only the last one's unless the layout is aligned)."""
        ends = [seg.offset for seg in self.segments[1:]] + [self.start + self.numel]
        return [
            (s.offset + s.numel, e)
            for s, e in zip(self.segments, ends, strict=True)
            if s.offset + s.numel < e
        ]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_buckets(
    numels: list[int], indices: list[int], world_size: int, bucket_numel: int, align: int = 1
) -> tuple[list[Bucket], int]:
    """Cut parameters of ``numels`` (with global ``indices``) into padded buckets.

    Returns the buckets and the flat buffer's total (padded) size. A parameter larger than
    ``bucket_numel`` gets a bucket of its own; otherwise parameters are added in order until
    the bucket holds at least ``bucket_numel`` elements. With ``align`` every parameter
    starts at a multiple of it and every bucket's size is a multiple of
    ``world_size * align`` (so every rank's chunk starts at a multiple of ``align``).
    """
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size}")
    if bucket_numel < 1:
        raise ValueError(f"Invalid bucket_numel: {bucket_numel}")
    if align < 1:
        raise ValueError(f"Invalid align: {align}")
    buckets: list[Bucket] = []
    start = 0
    current: list[Segment] = []
    filled = 0

    def close() -> None:
        nonlocal start, current, filled
        padded = _round_up(filled, world_size * align)
        buckets.append(Bucket(start, padded, tuple(current)))
        start += padded
        current, filled = [], 0

    for index, numel in zip(indices, numels, strict=True):
        filled = _round_up(filled, align)
        current.append(Segment(index, start + filled, numel))
        filled += numel
        if filled >= bucket_numel:
            close()
    if current:
        close()
    return buckets, start


@dataclass(frozen=True)
class Layout:
    """The buckets of every parameter class, split over ``world_size`` ranks.

    A rank's shards are numbered class by class, bucket by bucket: its shard k is its chunk
    of ``buckets[k]``.
    """

    world_size: int
    classes: tuple[tuple[Bucket, ...], ...]

    @property
    def buckets(self) -> tuple[Bucket, ...]:
        return tuple(b for buckets in self.classes for b in buckets)

    @property
    def numel(self) -> int:
        """Elements of all the flat buffers together, padding included."""
        return sum(b.numel for b in self.buckets)

    def pieces(self, rank: int) -> list[list[tuple[int, int, int, int]]]:
        """``Bucket.pieces`` of each of ``rank``'s shards, in shard order."""
        return [b.pieces(rank, self.world_size) for b in self.buckets]


def reshard(saved: Layout, ours: Layout, rank: int) -> list[list[tuple[int, int, int, int, int]]]:
    """What rank ``rank`` of ``ours`` copies from each rank of ``saved`` to hold its shards.

    Per saved rank: (our shard, start in it, saved shard, start in it, length) for every
    run of one parameter's elements that both shards hold; padding is in neither, so it
    stays as it was.
    """
    mine: dict[int, list[tuple[int, int, int, int]]] = {}  # i -> (shard, at, start, length)
    for k, pieces in enumerate(ours.pieces(rank)):
        for i, at, start, length in pieces:
            mine.setdefault(i, []).append((k, at, start, length))
    copies: list[list[tuple[int, int, int, int, int]]] = []
    for r in range(saved.world_size):
        copies.append([])
        for k_saved, pieces in enumerate(saved.pieces(r)):
            for i, src, start, length in pieces:
                for k, at, s, n in mine.get(i, ()):
                    a, e = max(start, s), min(start + length, s + n)
                    if a < e:
                        copies[r].append((k, at + a - s, k_saved, src + a - start, e - a))
    return copies
