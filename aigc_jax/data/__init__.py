"""Data sources. `data.source` names one: `tfds:NAME`, `text_file:PATH` or `embedded:NAME`."""
