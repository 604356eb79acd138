"""Token-score shards (format version 1): Arrow IPC stream files plus a manifest. Their schema (format), layout
(file names, documents per shard, parts, wholeness), scoring, writer, reader, checks and reports."""

from slm.shards.format import FORMAT_VERSION, ShardMetadata  # noqa: F401
from slm.shards.manifest import Manifest, load_manifest  # noqa: F401
from slm.shards.reader import ShardSet  # noqa: F401
from slm.shards.writer import ShardWriter  # noqa: F401
