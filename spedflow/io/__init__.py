"""Reading microscope files, writing chunked Zarr, and the result store."""

from ._store import (DATA, TARGET_CHUNK_BYTES, atomic_store, check_destination, compressors,
                     create_array, nav_chunks, open_input, read_meta, verify_store)

__all__ = ["DATA", "TARGET_CHUNK_BYTES", "atomic_store", "check_destination", "compressors",
           "create_array", "nav_chunks", "open_input", "read_meta", "verify_store"]
