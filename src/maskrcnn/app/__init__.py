"""The commands' use cases: what `maskrcnn train`, `evaluate`, `predict`, `export` (and the commands added later)
do end to end, built from engine, viz and export. The command line parses, calls one of these, and prints."""
