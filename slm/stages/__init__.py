"""One thin module per stage: read the typed config, call library code, write outputs and stage.json."""
