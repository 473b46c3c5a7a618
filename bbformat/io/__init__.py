"""I/O: where the bytes of a .bbf come from (local mmap, memory, HTTP, S3) and go to (atomic writes).

    store.py      Store, LocalStore, BufferStore, RemoteStore, open_store, AtomicSink
    fetch.py      the fetch engine: chunked concurrent ranged reads, retries, FetchOptions, Prefetcher
    transport.py  one ranged GET over HTTP, S3 or fsspec, with the object pinned; failures classified
"""

from .fetch import FetchOptions  # noqa: F401
