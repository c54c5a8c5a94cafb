"""The study's report, statistics apart from rendering.

Data in, data out: :mod:`.stats` (intervals, verdicts, rank trends), :mod:`.records` (the
record schema, paired cells, summaries), :mod:`.claims` (the paper's claims and the
ablation tables decided from records) and :mod:`.diagnosis` (memorisation, recipe and
scale statistics). Rendering: :mod:`.markdown` and :mod:`.plots`. :mod:`.assemble`
writes ``report.md``, ``claims.json``, ``results.json`` and the figures of a run.
"""
