"""Small helpers every part of slm uses: atomic file writes and sha256 fingerprints (`io`), PNG plots (`plots`)."""
