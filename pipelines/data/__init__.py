"""Data: load the shipped real sets, split them, simulate the event log, snapshot, validate (GX)."""
