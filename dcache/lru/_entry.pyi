"""Types of the C extension ``dcache.lru._entry`` (``_entry.c``): the attributes of ``cache.PyEntry``."""

VERSION_BIAS: int

class Entry:
    """One cached item and a node of the LRU list, its key and value in one buffer."""

    expires_at: int
    version: int
    _version: int
    value: bytes
    prev: Entry
    next: Entry
    @property
    def key(self) -> bytes: ...
    def __init__(self, key: bytes, value: bytes, expires_at: int = 0, version: int = 0) -> None: ...
