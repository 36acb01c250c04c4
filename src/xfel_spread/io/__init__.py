"""File formats: the HDF5 shard layout (``shard``) and its dxtbx reader (``dxtbx_format``).

``dxtbx_format`` needs dxtbx, so it is not imported here; dxtbx loads it through the entry point.
"""

from xfel_spread.io.shard import (
    ShardFormatError,
    ShardMetadata,
    ShardWriter,
    open_shard_writer,
    read_shard_image,
    read_shard_metadata,
    read_shard_spectrum,
    write_shard,
)

__all__ = [
    "ShardFormatError",
    "ShardMetadata",
    "ShardWriter",
    "open_shard_writer",
    "read_shard_image",
    "read_shard_metadata",
    "read_shard_spectrum",
    "write_shard",
]
