"""Reading microscope files, writing chunked Zarr, and the result store."""

from ._info import format_info, store_info
from ._ingest import ingest
from ._readers import MAX_ELEMENTS, SUPPORTED_EXTENSIONS, open_source
from ._store import (DATA, TARGET_CHUNK_BYTES, atomic_store, check_destination,
                     check_side_directory, compressors,
                     create_array, creation_stamp, nav_chunks, open_input, read_meta, verify_store)

__all__ = ["DATA", "TARGET_CHUNK_BYTES", "atomic_store", "check_destination",
           "check_side_directory", "compressors",
           "create_array", "creation_stamp", "nav_chunks", "open_input", "read_meta", "verify_store",
           "open_source", "ingest", "store_info", "format_info", "SUPPORTED_EXTENSIONS",
           "MAX_ELEMENTS"]
