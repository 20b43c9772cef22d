"""Generated protocol code for tdb (DO NOT EDIT: scripts/gen_proto.py writes it)."""
