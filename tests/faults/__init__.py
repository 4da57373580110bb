"""Fault injection and fuzzing: a TCP fault proxy, a load checker, fault tests and fuzz targets."""
