"""The study's data: :mod:`.vision` (offline glyph and digit data, real-data loaders),
:mod:`.clip` (offline image-caption pairs) and :mod:`.text` (GLUE / GLUE-X, the shipped
WordNet task ``wordnet_task.jsonl.gz`` with WordNet's licence beside it, a tiny task);
:mod:`.make_wordnet_task` rebuilds the WordNet file."""
