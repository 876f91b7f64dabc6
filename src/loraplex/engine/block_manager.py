"""BlockManager: fixed-size KV-cache blocks handed to requests, and the prefix cache over them. No torch.

Prefix caching (as vLLM's and SGLang's): a full block's identity is a hash chain over (the previous block's
hash, the block's token ids), rooted in the request's *namespace*: the adapter's name, version and a digest
of its weights (or "base"), plus an optional per-request cache salt. A block computed under one namespace is
only ever found by a request of the same namespace, so tenants never share K/V: not base with an adapter,
not A with B, not A@1 with A@2, not an adapter re-registered under its old name with other weights.

Every block is in exactly one state:
  free       refs 0, no hash          in `_free`
  cached     refs 0, hash             in `_evictable` (LRU first): reused on a hit, reclaimed when space is needed
  in use     refs >= 1 (shared when > 1, hashed once full and computed)
A request never writes into a block it found in the cache: its computation starts after its cached blocks,
and at least one token (the last) is always computed, for its logits.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable

from loraplex.engine.request import Request


def namespace(adapter: Hashable | None, digest: bytes, cache_salt: str | None) -> bytes:
    """The root of a request's hash chain: its adapter (str(key) = "name@version") and that version's weights
    digest, or the base model; and its cache salt."""
    h = hashlib.sha256(b"base" if adapter is None else b"lora\0" + str(adapter).encode() + b"\0" + digest)
    if cache_salt is not None:
        h.update(b"\0salt\0" + cache_salt.encode())
    return h.digest()


def chain(parent: bytes, token_ids: list[int]) -> bytes:
    """A full block's hash: the previous block's hash (or the namespace) and the block's token ids."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = enable_caching
        self._free = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; least recently freed first
        self._refs = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self.evictions = 0  # cached blocks reclaimed for new content

    @property
    def num_free(self) -> int:
        """Blocks a request can take now: empty ones and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks whose content can be found by hash (held or not)."""
        return len(self._by_hash)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(req.block_ids))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def allocate(self, req: Request, num_tokens: int) -> None:
        """Grow `req`'s block list to hold `num_tokens` tokens."""
        for _ in range(self.blocks_needed(req, num_tokens)):
            b = self._take_empty()
            self._refs[b] = 1
            req.block_ids.append(b)

    def _take_empty(self) -> int:
        if self._free:
            return self._free.pop()
        b, _ = self._evictable.popitem(last=False)  # the least recently used cached block
        self._forget(b)
        self.evictions += 1
        return b

    def _forget(self, b: int) -> None:
        h = self._hash[b]
        if h is not None:
            del self._by_hash[h]
            self._hash[b] = None

    def free(self, req: Request, keep_cached: bool = True) -> None:
        """Drop `req`'s references. A block nobody holds any more stays findable (cached) if it was full, else
        becomes empty. Last blocks first, so a sequence's tail is reclaimed before its head.
        keep_cached=False (a request that failed in a step, its K/V maybe NaN): none of its blocks can be found
        again; blocks that others still hold stay theirs, and are emptied when they let go."""
        if not keep_cached:
            for b in req.block_ids:
                self._forget(b)
        for b in reversed(req.block_ids):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if self._hash[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
        req.block_ids = []
        req.num_committed_blocks = 0

    # ---- prefix cache ---------------------------------------------------------------------------------
    def _hashes(self, req: Request, num_blocks: int) -> list[bytes]:
        """The hash chain of `req`'s first `num_blocks` full blocks (extended on demand, kept on the request)."""
        assert req.cache_namespace is not None
        hashes, bs = req.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            j = len(hashes)
            hashes.append(chain(hashes[-1] if hashes else req.cache_namespace,
                                [req.token_at(p) for p in range(j * bs, (j + 1) * bs)]))
        return hashes[:num_blocks]

    def match(self, req: Request) -> list[int]:
        """The cached blocks holding `req`'s longest cached prefix of full blocks; the last token is never
        among them (it must be computed for the logits). Empty when caching is off."""
        if not self.caching or req.cache_namespace is None:
            return []
        found = []
        for h in self._hashes(req, (req.num_tokens - 1) // self.block_size):
            b = self._by_hash.get(h)
            if b is None:
                break
            found.append(b)
        return found

    def reclaimed_by(self, blocks: list[int]) -> int:
        """How many of `blocks` (from match) sit unreferenced in the cache: taking them uses free capacity."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def take_cached(self, req: Request, blocks: list[int]) -> None:
        """Give a waiting request (no blocks yet) the cached blocks `match` found: its K/V up to them is computed."""
        assert not req.block_ids
        for b in blocks:
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
        req.block_ids = list(blocks)
        req.num_committed_blocks = len(blocks)
        req.num_computed_tokens = len(blocks) * self.block_size

    def commit(self, req: Request) -> None:
        """Make `req`'s newly full, computed blocks findable. A block whose content is cached already (another
        request computed the same prefix at the same time) stays private and is emptied when freed."""
        if not self.caching or req.cache_namespace is None:
            return
        full = req.num_computed_tokens // self.block_size
        if full <= req.num_committed_blocks:
            return
        hashes = self._hashes(req, full)
        for j in range(req.num_committed_blocks, full):
            b = req.block_ids[j]
            if self._hash[b] is None and hashes[j] not in self._by_hash:
                self._hash[b] = hashes[j]
                self._by_hash[hashes[j]] = b
        req.num_committed_blocks = full

    def reset(self) -> int:
        """Forget every cached block (held blocks keep their content but can no longer be found); returns how
        many blocks were findable."""
        n = len(self._by_hash)
        for b in self._evictable:
            self._hash[b] = None
            self._free.append(b)
        self._evictable.clear()
        for b in self._by_hash.values():
            self._hash[b] = None
        self._by_hash.clear()
        return n

    def check(self, held: list[list[int]]) -> None:
        """Assert the bookkeeping against the block lists of every request holding blocks (tests)."""
        refs = [0] * self.num_blocks
        for blocks in held:
            for b in blocks:
                refs[b] += 1
        assert refs == self._refs, "reference counts differ from the requests' block lists"
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evictable, "a block is listed twice"
        for b in range(self.num_blocks):
            state = (b in free, b in evictable, refs[b] > 0)
            assert sum(state) == 1, f"block {b} is in {state} (free, cached, in use)"
            assert (b in free) == (self._hash[b] is None and refs[b] == 0), f"block {b}: free iff unhashed and unheld"
        assert all(self._hash[b] == h for h, b in self._by_hash.items()), "hash index out of date"
        assert sum(h is not None for h in self._hash) == len(self._by_hash)
