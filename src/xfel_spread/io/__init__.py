"""File formats, each reader next to its writer: the HDF5 shard layout (``shard``) and its dxtbx reader
(``dxtbx_format``); DIALS experiment lists and their reflections (``expt``); one shard's stills_process
outputs and shots table (``stills``); the merge's lattice table (``lattices``); merged MTZs (``mtz``);
images from elsewhere, their spectra and masks (``images``); and the one TSV writer (``tables``).

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
