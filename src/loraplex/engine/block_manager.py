"""BlockManager: fixed-size KV-cache blocks handed to requests from a free list. No torch."""

from __future__ import annotations

from loraplex.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(req.block_ids))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, req: Request, num_tokens: int) -> None:
        """Grow `req`'s block list to hold `num_tokens` tokens."""
        for _ in range(self.blocks_needed(req, num_tokens)):
            req.block_ids.append(self._free.pop())

    def free(self, req: Request) -> None:
        self._free.extend(reversed(req.block_ids))
        req.block_ids = []
